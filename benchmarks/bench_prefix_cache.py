"""Prefix cache (issue 5): what the radix-tree prefix cache saves on shared system prompts and multi-turn chat.

One process, the same weights (the GGUF file behind ``--model``) and dtype for every system.

Part 1, shared system prompt. A system prompt of exactly ``--system-tokens`` (1,024) token ids of English
text (``common.PROSE`` after a one-line instruction, tokenized with the model's tokenizer and cut), then a
different question of ``--question-tokens`` (64) ids per request (English questions about the text, a
different combination per request), greedy, EOS ignored, ``--max-tokens`` (16) new tokens.

  (a) TTFT cold vs warm, one request at a time, on ``LLM(kv_cache="paged", max_model_len=2048,
      enable_prefix_caching=True, max_num_batched_tokens=2048)`` driven step by step (add_request, then
      step() until the first output holding a token; TTFT = add_request -> that step's return). Each of
      ``--ttft-runs`` rounds empties the prefix tree (evicts every cached block), runs one request (cold:
      nothing cached, the whole 1,088-token prompt is computed), then ``--warm-per-run`` requests with the
      same system prompt and other questions (warm: the 1,024 system tokens come from the cache), then the
      cold request's exact prompt once more (repeat: all but its last partial block is cached, as in
      llama.cpp's "repeated prompt"). Every request runs to completion (so its blocks enter the tree)
      before the next starts.
  (b) ``--num-requests`` (32) requests, all given at once to ``llm.generate(id lists, SamplingParams(
      temperature=0, max_tokens=16, ignore_eos=True))``: prefix caching on (tree emptied first) vs off (a
      second LLM with ``enable_prefix_caching=False``, otherwise the same). Wall time, greedy outputs
      compared, hit rate = prefix_cache_hits / prefix_cache_queries (tokens) from ``llm.cache_stats()``.
      Also, unless ``--no-primed``: caching on with the system prompt already in the tree (one request
      run before the batch), the steady state of a server whose system prompt is cached.

Part 2, multi-turn chat. ``--conversations`` (8) conversations x ``--turns`` (6) turns, the model's chat
template (SmolLM2's adds its default system message), each user turn a different short question; turn t of
all conversations runs as one batch ``llm.chat([conv1, ..., conv8], SamplingParams(temperature=0,
max_tokens=32))`` (replies stop at EOS or 32 tokens), and each reply's text is appended to its history.
The caching-on run builds the histories; the caching-off run and HF are given the very same message lists
/ prompt token ids per turn, so all systems see identical histories. Measured: the share of prompt tokens
served from the cache (sum num_cached_tokens / sum prompt tokens, per turn and overall), total time of the
6 turns for kvserve on / off and HF transformers ``model.generate`` (no prefix cache: each turn's whole
prompt, the 8 conversations as one left-padded batch, greedy, max_new_tokens=32, stops at EOS).

    .venv/bin/python benchmarks/bench_prefix_cache.py            # full run (~10 min on 2 shared cores)
    .venv/bin/python benchmarks/bench_prefix_cache.py --quick    # small smoke test
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import sys
import time
from pathlib import Path

# No OMP_WAIT_POLICY=PASSIVE here (session 5): one process runs one system at a time, and sleeping OpenMP
# threads add a wake-up to each of the ~300 parallel regions of a forward: tens of ms on a short warm or
# repeated prefill, noise on a cold one, so it shrank exactly the ratios this script measures.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every system in the process (kvserve and its peer alike) allocates large tensors on 2 MiB pages
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kvserve` without an install

from common import (  # noqa: E402
    PROSE, RESULTS_DIR, cpu_info, fmt, format_cpu_info, format_table, left_pad, load_hf, median, now_iso, prompt_ids, pyplot,
    save_json,
)

from kvserve.engine.llm_engine import resolve_dtype  # noqa: E402
from kvserve.llm import LLM  # noqa: E402
from kvserve.models.loader import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402

# Context only, NOT measured here: /work/shared/design/perf-notes.md (llama.cpp via llama-cpp-python 0.3.36, Q4_1
# weights, f16 KV, the project's 2-core machines).
PEER_CONTEXT = {
    "llama.cpp_repeated_prompt_ttft_ms": "9-16",
    "llama.cpp_prompt_eval_tok_s": "154-286",
    "vllm_cpu_cached_1024_prefix_ttft_ratio": "12x lower than cold",
    "source": "/work/shared/design/perf-notes.md (not measured in this run)",
}

SYSTEM_INTRO = ("You are a helpful assistant. Answer the user's questions using the notes below; quote them where "
                "you can and say so when the notes do not cover something.\n\nNotes:\n\n")

# Part 1: questions about the system prompt's text. Each request's question joins three of these (and a
# closing request for the form of the answer) in its own combination, then is cut to --question-tokens ids.
DOC_QUESTIONS = [
    "Why did sailors rely on bonfires before there were electric lamps in lighthouses?",
    "How long did the Pharos of Alexandria stand, and what did it give its name to?",
    "What did lighthouse keepers do through the night, according to the notes?",
    "Which vegetables in a kitchen garden can be sown in succession, and why would anyone do that?",
    "Where should tomatoes and peppers be planted in the garden?",
    "What is compost made from, and what does it return to the soil?",
    "Why does a simple rotation of crops help a vegetable garden from year to year?",
    "How do river floods make the surrounding plain so fertile over the centuries?",
    "Which early civilisations learned to predict the yearly rise of the water?",
    "What records did the people of the river valleys keep, and why did they keep them?",
    "Why do some historians argue that writing grew out of counting harvests and debts?",
    "What balance does the design of a good library try to strike?",
    "What do reading rooms need so that people can stay in them for hours?",
    "Who paid for many public libraries in the late nineteenth century?",
    "Why were public libraries so important to generations of children?",
    "How did the role of a lighthouse change as coastal trade grew?",
    "Which root vegetables keep well through the winter, and where should they be stored?",
    "What did the canals and embankments along the great rivers make possible?",
    "How do shelves arranged by subject help a reader, and what can they lead to?",
    "What links the history of the lighthouse to the history of trade along the coast?",
    "What would you plant first in a new kitchen garden, going by the notes?",
    "How did people in the river valleys survive the lean months of the year?",
    "What does the word Pharos tell us about the influence of the tower at Alexandria?",
    "Which of the topics in the notes has changed most over the last hundred years?",
]
ANSWER_FORMS = [
    "Please answer in two or three short sentences.",
    "Keep the answer brief and use plain words.",
    "Answer with a short list of the main points.",
    "Give a one-paragraph answer that a child could follow.",
    "Answer briefly, then say which part of the notes you used.",
    "Start with the most important fact and keep it short.",
    "Reply in a few sentences without repeating the question.",
    "Be concise and mention any numbers the notes give.",
]

# Part 2: short user questions, a different one for every turn of every conversation.
CHAT_QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "How many legs does a spider have?",
    "What do bees make?", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
    "Name a large ocean.", "What is photosynthesis?", "How far is the Moon from Earth?",
    "What do cows eat?", "Why do leaves change colour in autumn?", "What is a prime number?",
    "Which planet is the largest?", "How do birds fly?", "What is the tallest mountain?",
    "What language is spoken in Brazil?", "How many days are in a leap year?", "What is rain made of?",
    "Who painted the Mona Lisa?", "What is the speed of light?", "Why do we need sleep?",
    "What is the main gas in the air?", "How do fish breathe?", "What is a volcano?",
    "How many continents are there?", "What does a thermometer measure?", "Why is the sea salty?",
    "What is the freezing point of water?", "Which animal is the fastest on land?", "What is gravity?",
    "How does a rainbow form?", "What is the largest desert?", "Who invented the telephone?",
    "What do plants need to grow?", "Why does the Moon change shape?", "What is a noun?",
    "How many hours are in a week?", "What is the longest river?", "Why do cats purr?",
    "What is an island?", "How do magnets work?", "What is the smallest planet?",
    "What are clouds made of?", "Which metal is liquid at room temperature?", "What is a fraction?",
    "Why do we have seasons?", "What does a heart do?", "How are mountains formed?",
]

METHOD = {
    "ttft": "engine driven directly: t0 = perf_counter(); add_request(None, SamplingParams(temperature=0, max_tokens=N, "
            "ignore_eos=True), prompt_token_ids=ids); step() until an output holds a token; TTFT = that step's return - t0. "
            "Prefill is one step (max_num_batched_tokens=2048 >= prompt). The request then runs to completion, untimed.",
    "cold": "the prefix tree is emptied (every cached block evicted) just before: nothing of the prompt is cached",
    "warm": "after the cold request of the same round finished: its system prompt (and its own question + output) is "
            "in the tree; the warm request has the same system prompt and a different question",
    "batch": "llm.generate(list of id lists, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), use_tqdm=False), "
             "wall time of the call; hit rate from the change in cache_stats() prefix_cache_hits / prefix_cache_queries "
             "(tokens) over the call",
    "multi_turn": "turn t: llm.chat([conv_1..conv_C], SamplingParams(temperature=0, max_tokens=M)), wall time summed over "
                  "turns (chat template + tokenization included for kvserve); reply text appended as the assistant "
                  "message. Off and HF get the caching-on run's message lists / prompt token ids.",
    "hf": "model.generate on the C conversations' prompt token ids of the turn (the kvserve on-run's ids) as ONE "
          "left-padded batch with attention mask, do_sample=False, max_new_tokens=M, stops at EOS (pad afterwards), "
          "DynamicCache, no prefix reuse between turns; timed around generate (ids are precomputed)",
}


# ---------------------------------------------------------------- prompts


def system_prompt_ids(tok, n: int) -> list[int]:
    return prompt_ids(tok, n, text=SYSTEM_INTRO + "\n".join([PROSE] * 4))  # the intro once, the notes as needed


def question_ids(tok, i: int, n: int) -> list[int]:
    """Question i: four DOC_QUESTIONS in an order drawn for i, then an ANSWER_FORMS line, cut to n ids."""
    rng = random.Random(1000 + i)
    parts = rng.sample(DOC_QUESTIONS, 4) + [ANSWER_FORMS[i % len(ANSWER_FORMS)]]
    ids = tok.encode("\n\nQuestion: " + " ".join(parts), add_special_tokens=False)
    if len(ids) < n:
        raise RuntimeError(f"question {i} has only {len(ids)} tokens (< {n}): lengthen the question texts")
    return ids[:n]


def make_questions(tok, count: int, n: int) -> list[list[int]]:
    qs = [question_ids(tok, i, n) for i in range(count)]
    if len({tuple(x) for x in qs}) != count:
        raise RuntimeError("question texts repeat: extend DOC_QUESTIONS")
    return qs


# ---------------------------------------------------------------- helpers


def warm_up(llm: LLM, tok) -> None:
    """First-call costs (allocations, kernel choice) paid on text outside the workload, then the tree emptied."""
    text = ("Before the measured work begins, each system answers requests like this one, so that first-call costs "
            "such as memory allocation and kernel selection are paid outside the timed region. ") * 40
    ids = tok.encode(text, add_special_tokens=False)
    llm.generate([ids[:600], ids[5:45], ids[9:30]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    empty_tree(llm)


def empty_tree(llm: LLM) -> None:
    pc = llm.prefix_cache
    if pc is None:
        return
    pc.evict(pc.num_blocks)
    if pc.num_blocks or llm.cache_stats()["blocks_cached"]:
        raise RuntimeError(f"could not empty the prefix tree: {llm.cache_stats()}")


def ttft_request(llm: LLM, ids: list[int], n: int) -> dict:
    e = llm.engine
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    rid = e.add_request(None, params, prompt_token_ids=ids)
    ttft, steps_to_first, cached, tokens = None, 0, None, []
    while e.has_unfinished_requests():
        outs = e.step()
        now = time.perf_counter()
        if ttft is None:
            steps_to_first += 1
        for o in outs:
            if o.request_id != rid:
                continue
            if ttft is None and o.outputs[0].token_ids:
                ttft = now - t0
            cached = o.num_cached_tokens
            tokens = list(o.outputs[0].token_ids)
    if ttft is None or len(tokens) != n:
        raise RuntimeError(f"expected {n} tokens, got {len(tokens)}")
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "steps_to_first_token": steps_to_first,
            "prompt_tokens": len(ids), "num_cached_tokens": cached, "tokens": tokens, "prompt_ids": ids}


def stats_delta(before: dict, after: dict) -> dict:
    q = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    h = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return {"prefix_cache_queries": q, "prefix_cache_hits": h, "hit_rate": h / q if q else None}


def run_batch(llm: LLM, prompts: list[list[int]], n: int) -> dict:
    e = llm.engine
    before, steps0 = llm.cache_stats(), e.stats["steps"]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    after = llm.cache_stats()
    # each request's TTFT inside the batch: submitted together, so it includes waiting for the others'
    # prefills, which is exactly what a shared system prompt in the cache saves when 32 users arrive at once
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    return {"wall_s": wall, "steps": e.stats["steps"] - steps0, **stats_delta(before, after),
            "ttft_s": ttft, "ttft_median_s": median(ttft), "ttft_mean_s": sum(ttft) / len(ttft),
            "ttft_p90_s": sorted(ttft)[int(0.9 * (len(ttft) - 1))],
            "num_cached_tokens": [o.num_cached_tokens for o in outs],
            "prompt_tokens": sum(len(p) for p in prompts), "preemptions": after["preemptions"] - before["preemptions"],
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    firsts = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
    return {"identical": same, "total": len(a), "first_difference_at": [f for f in firsts if f is not None]}


def strip_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(t)
    return out


def run_chat(llm: LLM, turns: list[list[list[dict]]] | None, questions: list[list[str]], max_tokens: int) -> dict:
    """turns None: build the histories (append each reply's text); else replay the given message lists."""
    convs = len(questions)
    histories: list[list[dict]] = [[] for _ in range(convs)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    record, per_turn = [], []
    before = llm.cache_stats()
    total = 0.0
    for t in range(len(questions[0])):
        if turns is None:
            for c in range(convs):
                histories[c].append({"role": "user", "content": questions[c][t]})
            msgs = copy.deepcopy(histories)
        else:
            msgs = turns[t]
        gc.collect()
        t0 = time.perf_counter()
        outs = llm.chat(msgs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        total += dt
        record.append(msgs)
        prompt = [len(o.prompt_token_ids) for o in outs]
        cached = [o.num_cached_tokens for o in outs]
        per_turn.append({
            "turn": t + 1, "seconds": dt, "prompt_tokens": prompt, "num_cached_tokens": cached,
            "cached_share": sum(cached) / sum(prompt),
            "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
            "reply_tokens": [list(o.outputs[0].token_ids) for o in outs],
            "reply_text": [o.outputs[0].text for o in outs],
            "finish_reason": [o.outputs[0].finish_reason for o in outs],
        })
        if turns is None:
            for c, o in enumerate(outs):
                histories[c].append({"role": "assistant", "content": o.outputs[0].text})
    after = llm.cache_stats()
    prompt_total = sum(sum(p["prompt_tokens"]) for p in per_turn)
    cached_total = sum(sum(p["num_cached_tokens"]) for p in per_turn)
    return {"total_s": total, "per_turn": per_turn, "messages": record, "prompt_tokens": prompt_total,
            "cached_tokens": cached_total, "cached_share": cached_total / prompt_total, **stats_delta(before, after),
            "final_histories": histories if turns is None else None}


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new: int, pad_id: int, eos: tuple[int, ...]) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id)
    width = ids.shape[1]
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=pad_id,
                         eos_token_id=list(eos), temperature=None, top_p=None, top_k=None)
    return [strip_eos(row, eos) for row in out[:, width:].tolist()]


def run_hf_chat(model, on_run: dict, max_tokens: int, pad_id: int, eos: tuple[int, ...]) -> dict:
    per_turn, total = [], 0.0
    for turn in on_run["per_turn"]:
        prompts = turn["prompt_token_ids"]
        gc.collect()
        t0 = time.perf_counter()
        gen = hf_generate(model, prompts, max_tokens, pad_id, eos)
        dt = time.perf_counter() - t0
        total += dt
        per_turn.append({"turn": turn["turn"], "seconds": dt, "padded_to": max(len(p) for p in prompts),
                         "reply_tokens": gen})
    return {"total_s": total, "per_turn": per_turn}


# ---------------------------------------------------------------- plot


def plot(path: Path, res: dict, title: str, note: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), dpi=110)
    a = res["part1"]["ttft"]
    ax = axes[0]
    vals = [a["cold_median_ms"], a["warm_median_ms"], a["repeat_median_ms"]]
    bars = ax.bar(["cold\n(nothing cached)", f"warm: new question\n({a['warm_num_cached_tokens_median']:.0f} cached)",
                   f"same prompt again\n({median(a['repeat_num_cached_tokens']):.0f} cached)"], vals,
                  color=["#c44e52", "#55a868", "#8fbf8f"])
    ax.set_yscale("log")
    ax.set_ylim(10, max(vals) * 2)
    ax.set_ylabel("TTFT, ms (log)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"1 request, {a['prompt_tokens']}-token prompt: TTFT\n"
                 f"(medians; cold/warm = {a['cold_over_warm']:.1f}x, cold/same = {a['cold_over_repeat']:.1f}x)", fontsize=10)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f} ms", ha="center", va="bottom", fontsize=9)

    ax = axes[1]
    labels, vals, colors = [], [], []
    b = res["part1"]["batch"]
    nreq = res["args"]["num_requests"]
    for key, lab, col in (("on", f"{nreq} req\nkvserve on", "#55a868"), ("primed", f"{nreq} req\non, primed", "#8fbf8f"),
                          ("off", f"{nreq} req\nkvserve off", "#c44e52")):
        if key in b:
            labels.append(lab), vals.append(b[key]["wall_s"]), colors.append(col)
    n_batch_bars = len(labels)
    m = res["part2"]
    for key, lab, col in (("on", "chat\nkvserve on", "#55a868"), ("off", "chat\nkvserve off", "#c44e52"),
                          ("hf", "chat\nHF", "#4c72b0")):
        if key in m:
            labels.append(lab), vals.append(m[key]["total_s"]), colors.append(col)
    bars = ax.bar(labels, vals, color=colors)
    ax.axvline(n_batch_bars - 0.5, color="gray", linewidth=0.8)
    for bb, v in zip(bars, vals):
        ax.text(bb.get_x() + bb.get_width() / 2, v, f"{v:.1f}s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("total wall time, s")
    ax.set_title("shared system prompt batch / multi-turn chat: total time", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[2]
    pt = m["on"]["per_turn"]
    ax.plot([p["turn"] for p in pt], [100 * p["cached_share"] for p in pt], marker="o", label="per turn")
    ax.axhline(100 * m["on"]["cached_share"], linestyle="--", color="gray",
               label=f"all turns: {100 * m['on']['cached_share']:.1f} %")
    ax.set_ylim(0, 100)
    ax.set_xlabel("turn")
    ax.set_xticks([p["turn"] for p in pt])
    ax.set_ylabel("prompt tokens served from the prefix cache, %")
    ax.set_title("multi-turn chat: cached share of prompt tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, note, fontsize=7, alpha=0.8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or GGUF path (default %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on AVX2 CPUs, bf16 with avx512_bf16/AMX), float32, bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--system-tokens", type=int, default=None, help="shared system prompt length (default 1024)")
    p.add_argument("--question-tokens", type=int, default=64, help="question length per request (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request in part 1 (default %(default)s)")
    p.add_argument("--num-requests", type=int, default=None, help="part 1b batch size (default 32)")
    p.add_argument("--ttft-runs", type=int, default=None, help="part 1a rounds: 1 cold + --warm-per-run warm (default 4)")
    p.add_argument("--warm-per-run", type=int, default=2, help="warm requests per round (default %(default)s)")
    p.add_argument("--no-primed", action="store_true", help="skip the part 1b run with the system prompt pre-cached")
    p.add_argument("--conversations", type=int, default=None, help="part 2 conversations (default 8)")
    p.add_argument("--turns", type=int, default=None, help="part 2 turns per conversation (default 6)")
    p.add_argument("--reply-tokens", type=int, default=32, help="part 2 max reply tokens (default %(default)s)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers in part 2")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 512-token system prompt, 6 requests, 1 TTFT round, 3 conversations x 3 turns")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prefix_cache.json, *_quick for --quick)")
    p.add_argument("--plot", default=None, help="PNG path (default next to the JSON)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.system_tokens = a.system_tokens or (512 if q else 1024)
    a.num_requests = a.num_requests or (6 if q else 32)
    a.ttft_runs = a.ttft_runs or (1 if q else 4)
    a.conversations = a.conversations or (3 if q else 8)
    a.turns = a.turns or (3 if q else 6)
    if a.conversations * a.turns > len(CHAT_QUESTIONS):
        p.error(f"at most {len(CHAT_QUESTIONS)} chat questions (conversations x turns)")
    stem = "prefix_cache_quick" if q else "prefix_cache"
    a.out = Path(a.out) if a.out else RESULTS_DIR / f"{stem}.json"
    a.plot = Path(a.plot) if a.plot else a.out.with_suffix(".png")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, t_start = now_iso(), time.perf_counter()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    machine = cpu_info()
    print(format_cpu_info(machine))
    print(f"dtype:        {str(dtype).removeprefix('torch.')} (--dtype {args.dtype})")
    print(f"model:        {args.model}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"part 1:       system prompt {args.system_tokens} tokens + question {args.question_tokens} tokens, "
          f"{args.max_tokens} new tokens, greedy, EOS ignored; {args.ttft_runs} TTFT rounds x (1 cold + "
          f"{args.warm_per_run} warm); batch of {args.num_requests}")
    print(f"part 2:       {args.conversations} conversations x {args.turns} turns, replies <= {args.reply_tokens} tokens, "
          "greedy, stop at EOS", flush=True)

    src = resolve_model(args.model)
    tok = load_tokenizer(src)
    sys_ids = system_prompt_ids(tok, args.system_tokens)
    n_ttft_q = args.ttft_runs * (1 + args.warm_per_run)
    questions = make_questions(tok, n_ttft_q + args.num_requests, args.question_tokens)
    ttft_q, batch_q = questions[:n_ttft_q], questions[n_ttft_q:]
    prompt_len = args.system_tokens + args.question_tokens
    max_model_len = 2048
    if prompt_len + args.max_tokens > max_model_len:
        raise SystemExit(f"prompt + new tokens ({prompt_len + args.max_tokens}) > max_model_len {max_model_len}")
    kw = dict(dtype=dtype, kv_cache="paged", max_model_len=max_model_len, max_num_batched_tokens=2048)

    def load(prefix: bool) -> tuple[LLM, float]:
        t0 = time.perf_counter()
        llm = LLM(args.model, quantization=None, enable_prefix_caching=prefix, **kw)
        warm_up(llm, tok)
        return llm, time.perf_counter() - t0

    print("\nloading kvserve (prefix caching on) ...", end=" ", flush=True)
    llm_on, load_on = load(True)
    print(f"{load_on:.1f}s; (off) ...", end=" ", flush=True)
    llm_off, load_off = load(False)
    print(f"{load_off:.1f}s", flush=True)
    eng = llm_on.engine
    sched = eng.scheduler_config
    print(f"engine: block_size {eng.kv_cache.block_size}, {llm_on.cache_stats()['blocks_total']} blocks, "
          f"max_num_seqs {sched.max_num_seqs}, max_num_batched_tokens {sched.max_num_batched_tokens}", flush=True)

    # ---------------- part 1a: TTFT cold vs warm
    print(f"\n== part 1a: TTFT, one request at a time, {prompt_len}-token prompts")
    cold, warm, repeat = [], [], []
    qi = iter(ttft_q)
    for r in range(args.ttft_runs):
        empty_tree(llm_on)
        gc.collect()
        res = ttft_request(llm_on, sys_ids + next(qi), args.max_tokens)
        res["round"] = r
        cold.append(res)
        print(f"  round {r + 1}: cold TTFT {res['ttft_s'] * 1000:8.1f} ms (cached {res['num_cached_tokens']})", flush=True)
        for _ in range(args.warm_per_run):
            gc.collect()
            res = ttft_request(llm_on, sys_ids + next(qi), args.max_tokens)
            res["round"] = r
            warm.append(res)
            print(f"           warm TTFT {res['ttft_s'] * 1000:8.1f} ms (cached {res['num_cached_tokens']})", flush=True)
        gc.collect()
        res = ttft_request(llm_on, cold[-1]["prompt_ids"], args.max_tokens)
        res["round"] = r
        repeat.append(res)
        print(f"         repeat TTFT {res['ttft_s'] * 1000:8.1f} ms (cached {res['num_cached_tokens']})", flush=True)
    for x in cold + warm + repeat:
        x.pop("prompt_ids")
    cold_ms = 1000 * median(x["ttft_s"] for x in cold)
    warm_ms = 1000 * median(x["ttft_s"] for x in warm)
    repeat_ms = 1000 * median(x["ttft_s"] for x in repeat)
    ttft = {
        "prompt_tokens": prompt_len,
        "cold_ms": [1000 * x["ttft_s"] for x in cold], "warm_ms": [1000 * x["ttft_s"] for x in warm],
        "repeat_ms": [1000 * x["ttft_s"] for x in repeat],
        "cold_median_ms": cold_ms, "warm_median_ms": warm_ms, "cold_over_warm": cold_ms / warm_ms,
        "repeat_median_ms": repeat_ms, "cold_over_repeat": cold_ms / repeat_ms,
        "repeat_num_cached_tokens": [x["num_cached_tokens"] for x in repeat],
        "cold_num_cached_tokens": [x["num_cached_tokens"] for x in cold],
        "warm_num_cached_tokens": [x["num_cached_tokens"] for x in warm],
        "warm_num_cached_tokens_median": median(x["num_cached_tokens"] for x in warm),
        "target_x": 20, "target_met": cold_ms / warm_ms >= 20,
        "raw": {"cold": cold, "warm": warm, "repeat": repeat},
    }
    rows = [["cold (nothing cached)", len(cold), fmt(cold_ms), fmt(min(ttft["cold_ms"])), fmt(max(ttft["cold_ms"])),
             ",".join(str(x) for x in sorted(set(ttft["cold_num_cached_tokens"])))],
            ["warm (system prompt cached)", len(warm), fmt(warm_ms), fmt(min(ttft["warm_ms"])), fmt(max(ttft["warm_ms"])),
             ",".join(str(x) for x in sorted(set(ttft["warm_num_cached_tokens"])))],
            ["repeat (the cold request's exact prompt again)", len(repeat), fmt(repeat_ms), fmt(min(ttft["repeat_ms"])),
             fmt(max(ttft["repeat_ms"])), ",".join(str(x) for x in sorted(set(ttft["repeat_num_cached_tokens"])))]]
    ttft["table_markdown"] = format_table(["request", "n", "median TTFT ms", "min", "max", "num_cached_tokens"], rows)
    print(ttft["table_markdown"])
    print(f"cold / warm TTFT = {ttft['cold_over_warm']:.1f}x (target >= 20x: {'met' if ttft['target_met'] else 'NOT met'}); "
          f"cold / repeat = {ttft['cold_over_repeat']:.1f}x")
    print("context, NOT measured here (perf-notes.md): llama.cpp repeated-prompt TTFT 9-16 ms; vLLM-CPU 1,024-token "
          "cached prefix TTFT 12x lower than cold", flush=True)

    # ---------------- part 1b: 32 requests, caching on vs off
    print(f"\n== part 1b: {args.num_requests} requests sharing the system prompt, llm.generate, on vs off")
    batch_prompts = [sys_ids + q for q in batch_q]
    batch = {}
    empty_tree(llm_on)
    gc.collect()
    batch["on"] = run_batch(llm_on, batch_prompts, args.max_tokens)
    print(f"  on:     {batch['on']['wall_s']:7.1f}s  hit rate {batch['on']['hit_rate']:.3f} "
          f"({batch['on']['prefix_cache_hits']}/{batch['on']['prefix_cache_queries']} tokens)", flush=True)
    if not args.no_primed:
        empty_tree(llm_on)
        ttft_request(llm_on, sys_ids + ttft_q[0], 2)  # puts the system prompt in the tree (untimed)
        gc.collect()
        batch["primed"] = run_batch(llm_on, batch_prompts, args.max_tokens)
        print(f"  primed: {batch['primed']['wall_s']:7.1f}s  hit rate {batch['primed']['hit_rate']:.3f} "
              f"({batch['primed']['prefix_cache_hits']}/{batch['primed']['prefix_cache_queries']} tokens)", flush=True)
    gc.collect()
    batch["off"] = run_batch(llm_off, batch_prompts, args.max_tokens)
    print(f"  off:    {batch['off']['wall_s']:7.1f}s  hit rate {batch['off']['hit_rate'] or 0:.3f}", flush=True)
    ref = batch["off"]["tokens"]
    for k in batch:
        if k != "off":
            batch[k]["same_as_off"] = compare(batch[k]["tokens"], ref)
            batch[k]["speedup_vs_off"] = batch["off"]["wall_s"] / batch[k]["wall_s"]
    rows = []
    for k, lab in (("off", "kvserve, prefix caching off"), ("on", "kvserve, prefix caching on (empty tree)"),
                   ("primed", "kvserve, on, system prompt already cached")):
        if k not in batch:
            continue
        b = batch[k]
        cached = b["num_cached_tokens"]
        rows.append([lab, f"{b['wall_s']:.1f}", fmt(b.get("speedup_vs_off", 1.0), 2) + "x",
                     f"{b['ttft_median_s']:.2f}", f"{b['ttft_mean_s']:.2f}",
                     "-" if b["hit_rate"] is None else f"{100 * b['hit_rate']:.1f} %",
                     f"{sum(1 for c in cached if c > 0)}/{len(cached)}", b["steps"],
                     "-" if k == "off" else f"{b['same_as_off']['identical']}/{b['same_as_off']['total']}"])
    batch["table_markdown"] = format_table(
        ["system", "wall s", "speedup vs off", "TTFT p50 s", "TTFT mean s", "hit rate (tokens)",
         "requests with a hit", "steps", "outputs = off"], rows)
    print(batch["table_markdown"], flush=True)
    if "primed" in batch:
        b_off, b_pr = batch["off"], batch["primed"]
        batch["ttft_cold_over_warm"] = {"median": b_off["ttft_median_s"] / b_pr["ttft_median_s"],
                                        "mean": b_off["ttft_mean_s"] / b_pr["ttft_mean_s"]}
        print(f"TTFT of the {args.num_requests} requests, cold (caching off) / warm (system prompt cached): "
              f"median {batch['ttft_cold_over_warm']['median']:.1f}x, mean {batch['ttft_cold_over_warm']['mean']:.1f}x",
              flush=True)

    # ---------------- part 2: multi-turn chat
    print(f"\n== part 2: multi-turn chat, {args.conversations} conversations x {args.turns} turns")
    qs = [[CHAT_QUESTIONS[c * args.turns + t] for t in range(args.turns)] for c in range(args.conversations)]
    chat = {}
    empty_tree(llm_on)
    chat["on"] = run_chat(llm_on, None, qs, args.reply_tokens)
    print(f"  on:  {chat['on']['total_s']:7.1f}s  cached share {100 * chat['on']['cached_share']:.1f} % "
          f"({chat['on']['cached_tokens']}/{chat['on']['prompt_tokens']})", flush=True)
    chat["off"] = run_chat(llm_off, chat["on"]["messages"], qs, args.reply_tokens)
    print(f"  off: {chat['off']['total_s']:7.1f}s", flush=True)
    if [p["prompt_token_ids"] for p in chat["off"]["per_turn"]] != [p["prompt_token_ids"] for p in chat["on"]["per_turn"]]:
        raise RuntimeError("the off run saw other prompt ids than the on run")
    eos = eng.eos_token_ids
    on_replies = [strip_eos(r, eos) for p in chat["on"]["per_turn"] for r in p["reply_tokens"]]
    off_replies = [strip_eos(r, eos) for p in chat["off"]["per_turn"] for r in p["reply_tokens"]]
    chat["off"]["same_as_on"] = compare(off_replies, on_replies)
    hf_load_s = None
    if not args.no_hf:
        del llm_off
        gc.collect()
        print("  loading HF ...", end=" ", flush=True)
        hf_model, hf_load_s = load_hf(src, dtype)
        print(f"{hf_load_s:.1f}s", flush=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        hf_generate(hf_model, [sys_ids[:40], sys_ids[3:30]], 4, pad, eos)  # warm-up
        chat["hf"] = run_hf_chat(hf_model, chat["on"], args.reply_tokens, pad, eos)
        hf_replies = [r for p in chat["hf"]["per_turn"] for r in p["reply_tokens"]]
        chat["hf"]["same_as_on"] = compare(hf_replies, on_replies)
        print(f"  HF:  {chat['hf']['total_s']:7.1f}s", flush=True)
    for k in ("off", "hf"):
        if k in chat:
            chat[k]["on_speedup"] = chat[k]["total_s"] / chat["on"]["total_s"]
    turn_rows = []
    for i, p in enumerate(chat["on"]["per_turn"]):
        row = [p["turn"], sum(p["prompt_tokens"]), sum(p["num_cached_tokens"]), f"{100 * p['cached_share']:.1f} %",
               f"{p['seconds']:.2f}", f"{chat['off']['per_turn'][i]['seconds']:.2f}"]
        row.append(f"{chat['hf']['per_turn'][i]['seconds']:.2f}" if "hf" in chat else "-")
        turn_rows.append(row)
    turn_rows.append(["all", chat["on"]["prompt_tokens"], chat["on"]["cached_tokens"],
                      f"{100 * chat['on']['cached_share']:.1f} %", f"{chat['on']['total_s']:.2f}",
                      f"{chat['off']['total_s']:.2f}", f"{chat['hf']['total_s']:.2f}" if "hf" in chat else "-"])
    chat["table_markdown"] = format_table(
        ["turn", "prompt tokens (all convs)", "cached tokens", "cached share", "kvserve on s", "kvserve off s",
         "HF s"], turn_rows)
    print(chat["table_markdown"])
    print(f"cached share {100 * chat['on']['cached_share']:.1f} % (target >= 80 %: "
          f"{'met' if chat['on']['cached_share'] >= 0.8 else 'NOT met'}); off / on = {chat['off']['on_speedup']:.2f}x"
          + (f"; HF / on = {chat['hf']['on_speedup']:.2f}x" if "hf" in chat else ""))
    print(f"replies identical to kvserve on (tokens up to EOS): off {chat['off']['same_as_on']['identical']}/"
          f"{chat['off']['same_as_on']['total']}"
          + (f", HF {chat['hf']['same_as_on']['identical']}/{chat['hf']['same_as_on']['total']}" if "hf" in chat else ""))
    finish = [f for p in chat["on"]["per_turn"] for f in p["finish_reason"]]
    print(f"reply finish reasons (on): stop {finish.count('stop')}, length {finish.count('length')}")

    machine["load_average_end"] = list(os.getloadavg())
    elapsed = time.perf_counter() - t_start
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in machine['load_average_end'])}; "
          f"wall time {elapsed / 60:.1f} min")

    # the off run saw the on run's messages and prompt ids (checked above): keep one copy in the JSON
    for p in chat["off"]["per_turn"]:
        p.pop("prompt_token_ids", None)
    chat["off"]["messages"] = "same as part2.on.messages"
    result = {
        "benchmark": "prefix_cache",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "elapsed_s": elapsed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype": str(dtype).removeprefix("torch."),
        "model": {"name": args.model, "path": str(src.path)},
        "engine": {"kv_cache": "paged", "max_model_len": max_model_len, "max_num_batched_tokens": 2048,
                   "max_num_seqs": sched.max_num_seqs, "block_size": eng.kv_cache.block_size,
                   "blocks_total": llm_on.cache_stats()["blocks_total"], "load_s": {"on": load_on, "off": load_off},
                   "hf_load_s": hf_load_s},
        "machine": machine,
        "method": METHOD,
        "peer_context_not_measured": PEER_CONTEXT,
        "system_prompt_head_ids": sys_ids[:16],
        "part1": {"ttft": ttft, "batch": batch},
        "part2": chat,
    }
    print(f"\nsaved {save_json(args.out, result)}")
    if not args.no_plot:
        path = plot(args.plot, result,
                    f"{args.model} ({result['dtype']}): prefix cache, shared {args.system_tokens}-token system prompt "
                    f"and {args.conversations}x{args.turns}-turn chat",
                    f"{machine['cpu_model']}, {machine['torch_num_threads']} threads, torch {machine['torch_version']}; "
                    f"{started[:16]}; load avg {machine['load_average'][0]:.1f} at start" if machine.get("load_average")
                    else started)
        if path:
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
