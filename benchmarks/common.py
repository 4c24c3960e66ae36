"""Helpers shared by the benchmarks: machine info, medians, tables, prompts of real text, JSON and PNG output.

Nothing here imports matplotlib at module level: plots are optional and the import is slow.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# CPU flags that decide which kernels torch can use (bf16 / int8 / AMX paths).
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")

# Environment variables that hold torch, oneDNN and MKL below the CPU's own instruction set: with all
# three at AVX2, an AVX-512 machine runs the code an AVX2-only one would (not its memory or clocks).
ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

# Real English prose (written for this benchmark), repeated and cut to the length a prompt needs.
# Several paragraphs on different topics, so the prompt is not one sentence on a loop.
PROSE = """\
The history of the lighthouse is, in large part, the history of coastal trade. Long before electric lamps \
and Fresnel lenses, sailors relied on bonfires lit on headlands to mark dangerous rocks and the mouths of \
harbours. The Pharos of Alexandria, finished in the third century BC, stood for well over a thousand years \
and gave its name to the word for lighthouse in several languages. Later towers were built of stone and \
brick, and their keepers lived in small rooms below the lantern, trimming wicks and polishing glass through \
the night so that ships could find their way home.

A modern kitchen garden can feed a family for much of the year if it is planned with care. Beans, peas and \
leafy greens grow quickly and can be sown in succession, a short row every two weeks, so that the harvest \
arrives steadily rather than all at once. Root vegetables such as carrots and beetroot keep well in a cool \
shed, while tomatoes and peppers need the warmest, most sheltered corner. Compost made from kitchen scraps \
and fallen leaves returns nutrients to the soil, and a simple rotation of crops from bed to bed keeps \
pests and diseases from building up.

When a river floods, it spreads fine silt across the surrounding plain, and over centuries these deposits \
build some of the most fertile farmland on earth. Early civilisations along the Nile, the Tigris and the \
Yellow River learned to predict the yearly rise of the water and to store grain for the lean months. They \
dug canals, raised embankments and kept careful records of each season, and many historians argue that \
writing itself grew out of the need to count harvests, taxes and debts in these crowded river valleys.

The design of a good library is a quiet balance between order and discovery. Shelves arranged by subject \
let a reader walk straight to the book they came for, yet the neighbouring volumes invite a detour into \
something unexpected. Reading rooms need steady light, soft sound and chairs that can be sat in for hours. \
Many towns built their public libraries in the late nineteenth century with money from wealthy donors, and \
for generations of children these buildings were the first place where the whole world seemed to be open \
to them, one borrowed book at a time.
"""


# ---------------------------------------------------------------- machine


def cpu_info() -> dict[str, Any]:
    """CPU model, the flags that matter, torch build and threads, load average: enough to read a timing by."""
    model, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = "unknown"
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_flags": {f: f in flags for f in INTERESTING_FLAGS},
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": capability,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "transformers_version": tf_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(load) if load else None,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),  # torch's large allocations on huge pages
        # set: an instruction set below the CPU's emulated (docs/benchmarks.md, "AVX2 on machine C")
        "isa_limits": {k: os.environ[k] for k in ISA_LIMIT_VARS if k in os.environ},
        "date": now_iso(),
    }


def format_cpu_info(info: dict[str, Any]) -> str:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["cpu_flags"].items())
    amx = any(v for k, v in info["cpu_flags"].items() if k.startswith("amx"))
    load = info.get("load_average")
    lines = [
        f"CPU:          {info['cpu_model']} ({info['logical_cpus']} logical CPUs)",
        f"CPU flags:    {flags} (amx: {'yes' if amx else 'no'})",
        f"torch:        {info['torch_version']}, cpu capability {info['torch_cpu_capability']}, "
        f"{info['torch_num_threads']} threads ({info['torch_num_interop_threads']} interop)",
        f"transformers: {info['transformers_version']}, python {info['python_version']}",
    ]
    if info.get("isa_limits"):
        lines.append("ISA limited:  " + " ".join(f"{k}={v}" for k, v in info["isa_limits"].items()))
    if load:
        lines.append(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min; >{info['logical_cpus']} "
                     "means other work shares the CPUs)")
    return "\n".join(lines)


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- numbers


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table: fixed digits, thousands separators, '-' for missing."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """A right-aligned text table (GitHub markdown when ``markdown``: pastes straight into docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r):  # noqa: E306
        body = (" | " if markdown else "  ").join(c.rjust(w) for c, w in zip(r, widths))
        return f"| {body} |" if markdown else body
    out = [line(cells[0])]
    if markdown:
        out.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------- prompts


def prompt_ids(tokenizer, length: int, text: str = PROSE) -> list[int]:
    """``length`` token ids of real text: ``text`` tokenized with the model's tokenizer (no special
    tokens), repeated as needed and cut to exactly ``length``. Same ids for every system under test."""
    base = tokenizer.encode(text, add_special_tokens=False)
    if not base:
        raise ValueError("the prompt text tokenized to nothing")
    reps = -(-length // len(base))
    return (base * reps)[:length]


# ---------------------------------------------------------------- the llama.cpp peer

# Python lines that turn off llama.cpp's extra buffer types (its AMX and repacked-weight kernels) in the
# llama-cpp-python process that runs them. On the Sapphire Rapids machine its AMX kernel segfaults in
# ggml_backend_amx_mul_mat on the first prompt (llama-cpp-python 0.3.36, gdb backtrace); without extra
# buffers a Q4_1 file runs llama.cpp's AVX-512 path.
LLAMA_NO_EXTRA_BUFTS = """
import llama_cpp.llama_cpp as _C
_default_params = _C.llama_model_default_params
def _params():
    p = _default_params()
    p.use_extra_bufts = False
    return p
_C.llama_model_default_params = _params
"""


def llama_system_info(python: str) -> str | None:
    """llama.cpp's own line on the instruction sets its build uses (``llama_print_system_info``)."""
    import subprocess

    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def llama_extra_bufts_work(python: str, gguf: str) -> bool:
    """Whether llama.cpp with its extra buffer types survives one short prompt on this machine."""
    import subprocess

    probe = ("from llama_cpp import Llama\n"
             f"llm = Llama(model_path={gguf!r}, n_ctx=256, verbose=False)\n"
             "llm.eval(llm.tokenize(b'The capital of France is'))\n")
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=300).returncode == 0


# ---------------------------------------------------------------- output


def save_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def command_line() -> str:
    """How this script was run, for the JSON."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])


def settings_of(args) -> dict[str, Any]:
    """argparse values as JSON-safe settings (paths and other objects as strings)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v))
            for k, v in vars(args).items()}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF batched generate's input: token ids and attention mask, each prompt padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def load_hf(src, dtype: torch.dtype):
    """HF transformers' model for the same GGUF file (dequantized by transformers), and its load time in s."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, dtype=dtype)
    model.eval()
    return model, time.perf_counter() - t0


def save_line_plot(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    note: str | None = None,
    styles: dict[str, dict] | None = None,
) -> Path | None:
    """One line per series (name -> (xs, ys); None ys are skipped; ``styles`` holds extra plot() keywords per
    series). Returns None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            style = {"marker": "o", **((styles or {}).get(name, {}))}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    if logx:
        ax.set_xscale("log", base=2)
        xs_all = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.8)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def finish_figure(fig, title: str, path: Path) -> Path:
    """Title, lay out, save and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
