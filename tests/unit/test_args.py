"""One definition of the engine flags (``kvserve.args.EngineArgs``) and of what front ends do to prompts and
output text (``kvserve.prompts``).

The first tests read no weights. The last two run the offline path and the HTTP server's path (in
process, on the session's ``llm_paged``) side by side: chat prompts become the same token ids, and a
stream holds back exactly the text the engine holds back, no more and no less.
"""
from __future__ import annotations

import asyncio
import inspect
import json
from dataclasses import asdict, fields

import pytest

from kvserve.args import DEVICES, DTYPES, EngineArgs
from kvserve.cli import build_parser, main
from kvserve.config import KV_CACHE_DTYPES, KV_CACHE_MODES, PREEMPTION_MODES
from kvserve.llm import LLM
from kvserve.models.layers import QUANTIZATIONS
from kvserve.prompts import as_prompt_list, encode_chat, find_stop, normalize_prompt, stable_text
from kvserve.server.cli import add_serve_args

FIELDS = [f.name for f in fields(EngineArgs)]

# every field away from its default, so every flag must be there for the round trip to hold
EVERY_FLAG = EngineArgs(
    model="/models/other.gguf", dtype="bfloat16", device="cuda", quantization="w8a8", kv_cache="contiguous",
    block_size=32, kv_cache_memory="256MiB", num_kv_blocks=100, kv_cache_dtype="bfloat16",
    enable_prefix_caching=False, preemption_mode="swap", swap_space="1GiB", kv_cache_policy="sink_window",
    num_sink_tokens=8, sink_window=256, kv_offload_memory="8GiB", kv_cache_dir="/tmp/kv", kv_cache_dir_size="1GiB", kv_compression="snapkv:0.25",
    max_model_len=1024, max_num_seqs=4,
    max_num_batched_tokens=2048, enable_chunked_prefill=False, seed=7, tensor_parallel_size=3,
)


def parse(command: str, argv: list[str]) -> EngineArgs:
    if command == "python -m kvserve.server":
        import argparse

        ns = add_serve_args(argparse.ArgumentParser()).parse_args(argv)
    else:
        ns = build_parser().parse_args([command, *(["prompt"] if command in ("generate", "cache-tree") else []),
                                        *argv])
    return EngineArgs.from_cli_args(ns)


COMMANDS = ["generate", "chat", "cache-tree", "serve", "python -m kvserve.server"]


# ---------------------------------------------------------------------- EngineArgs
def test_llm_takes_exactly_the_engine_args():
    params = list(inspect.signature(LLM.__init__).parameters.values())[1:]  # without self
    assert [p.name for p in params] == FIELDS
    default = EngineArgs()
    assert {p.name: p.default for p in params} == asdict(default)


def test_every_field_differs_in_the_round_trip_fixture():
    default = EngineArgs()
    assert [f for f in FIELDS if getattr(EVERY_FLAG, f) == getattr(default, f)] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_a_flag_and_round_trips(command):
    assert parse(command, EVERY_FLAG.cli_args()) == EVERY_FLAG
    on = EngineArgs(kv_cache="paged", enable_prefix_caching=True, model="smollm2-135m", max_num_seqs=2)
    assert parse(command, on.cli_args()) == on


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_by_hand(command):
    a = parse(command, ["--kv-cache", "off", "--no-prefix-caching", "--no-chunked-prefill", "--max-model-len", "256",
                        "--kv-cache-memory", "64MiB", "--num-kv-blocks", "9", "--kv-cache-dtype", "float32",
                        "--preemption-mode", "swap", "--swap-space", "512MiB", "--dtype", "float32"])
    assert (a.kv_cache, a.enable_prefix_caching, a.enable_chunked_prefill, a.max_model_len) == ("off", False, False, 256)
    assert (a.kv_cache_memory, a.num_kv_blocks, a.kv_cache_dtype) == ("64MiB", 9, "float32")
    assert (a.preemption_mode, a.swap_space, a.dtype) == ("swap", "512MiB", "float32")


def test_defaults_are_llms():
    assert parse("serve", []) == EngineArgs()
    assert parse("python -m kvserve.server", []) == EngineArgs()
    # one conversation at a time: one sequence slot, else LLM's defaults
    assert parse("generate", []) == parse("chat", []) == EngineArgs(max_num_seqs=1)


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("flag,values", [
    ("--kv-cache", KV_CACHE_MODES), ("--preemption-mode", PREEMPTION_MODES), ("--kv-cache-dtype", KV_CACHE_DTYPES),
    ("--quantization", [q for q in QUANTIZATIONS if q]), ("--dtype", DTYPES), ("--device", DEVICES),
])
def test_choices_come_from_the_constants(command, flag, values):
    name = flag[2:].replace("-", "_")
    for v in values:
        assert getattr(parse(command, [flag, v]), name) == v


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flag,bad", [
    ("--kv-cache", "bogus"), ("--preemption-mode", "pause"), ("--kv-cache-dtype", "int3"), ("--quantization", "int3"),
    ("--dtype", "float64"), ("--device", "tpu"), ("--block-size", "sixteen"), ("--max-model-len", "1.5"),
])
def test_bad_values_are_refused_by_argparse(capsys, command, flag, bad):
    argv = [command, *(["prompt"] if command == "generate" else []), flag, bad]
    assert main(argv) == 2  # before any model is read
    err = capsys.readouterr().err
    assert flag in err and "invalid" in err and "Traceback" not in err


def test_create_engine_config():
    from dataclasses import replace

    # (the sink_window policy needs the paged cache and an unquantized one, the KV tiers a prefix cache:
    # each checked with its own flags)
    no_tiers = dict(kv_offload_memory=None, kv_cache_dir=None)
    sink = replace(EVERY_FLAG, kv_cache="paged", kv_cache_dtype="auto", **no_tiers).create_engine_config().cache
    assert (sink.kv_cache_policy, sink.num_sink_tokens, sink.sink_window) == ("sink_window", 8, 256)
    tiers = replace(EVERY_FLAG, kv_cache="paged", kv_cache_policy="full", enable_prefix_caching=True)
    t = tiers.create_engine_config().cache
    assert (t.kv_offload_memory, t.kv_cache_dir, t.kv_cache_dir_size) == (8 << 30, "/tmp/kv", 1 << 30)
    with pytest.raises(ValueError, match="prefix caching"):
        replace(tiers, enable_prefix_caching=False).create_engine_config()
    cfg = replace(EVERY_FLAG, kv_cache_policy="full", **no_tiers).create_engine_config()
    assert (cfg.model, cfg.dtype, cfg.device, cfg.quantization, cfg.seed, cfg.max_model_len) == (
        "/models/other.gguf", "bfloat16", "cuda", "w8a8", 7, 1024)
    c = cfg.cache
    assert (c.kv_cache, c.block_size, c.num_kv_blocks, c.kv_cache_dtype) == ("contiguous", 32, 100, "bfloat16")
    assert (c.kv_cache_memory, c.swap_space) == (256 << 20, 1 << 30)
    assert (c.enable_prefix_caching, c.preemption_mode) == (False, "swap")
    s = cfg.scheduler
    assert (s.max_num_seqs, s.max_model_len, s.enable_chunked_prefill) == (4, 1024, False)
    assert s.max_num_batched_tokens == 2048
    default = EngineArgs().create_engine_config()
    assert default.cache.kv_cache_dtype in (None, "auto") and default.cache.enable_prefix_caching
    assert default.max_model_len is None  # the engine reads it from the model


def test_from_engine_args_goes_through_llm():
    with pytest.raises(ValueError, match="smollm2-135m"):  # fails resolving the model, before any weight
        LLM.from_engine_args(EngineArgs(model="no-such-model"))


def test_estimate_takes_the_engine_flags(capsys):
    def est(*argv):
        assert main(["estimate", "--batch", "2", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    bf16 = est("--seq-len", "100", "--dtype", "bfloat16")
    assert est("--seq-len", "100", "--kv-cache-dtype", "bfloat16") == bf16
    assert bf16["dtype"] == "bfloat16" and bf16["dtype_bytes"] == 2
    assert est("--max-model-len", "100", "--dtype", "bfloat16") == bf16  # seq-len defaults to max-model-len
    assert est("--max-model-len", "100", "--block-size", "32")["block_size"] == 32
    # a contiguous slot is max_model_len long, whatever the sequence
    c = est("--seq-len", "100", "--max-model-len", "400", "--kv-cache", "contiguous")
    assert (c["num_blocks"], c["block_size"]) == (3, 400)
    assert c["allocated_bytes"] == c["formula_bytes"] + c["null_block_bytes"] + c["padding_bytes"]


# ---------------------------------------------------------------------- prompts, chat, stop strings
class _Tok:
    """Token ids are character codes; one BOS (1) in front unless asked not to add special tokens."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return "<s>" + turns + ("<assistant>" if add_generation_prompt else "")


def test_prompt_forms():
    tok = _Tok()
    assert as_prompt_list("hi") == ["hi"] and as_prompt_list([5, 6]) == [[5, 6]]
    assert as_prompt_list(["a", [5]]) == ["a", [5]] and as_prompt_list({"prompt": "a"}) == [{"prompt": "a"}]
    assert normalize_prompt("ab", tok) == ("ab", [1, 97, 98])
    assert normalize_prompt([5, 6], tok) == (None, [5, 6])
    assert normalize_prompt({"prompt": "ab"}, tok) == ("ab", [1, 97, 98])
    assert normalize_prompt({"prompt": "label", "prompt_token_ids": [7]}, tok) == ("label", [7])  # ids win
    assert normalize_prompt("label", tok, prompt_token_ids=[8]) == ("label", [8])
    with pytest.raises(ValueError, match="needs 'prompt' or 'prompt_token_ids'"):
        normalize_prompt({}, tok)
    with pytest.raises(ValueError, match="needs a prompt"):
        normalize_prompt(None, tok)


def test_chat_is_tokenized_without_a_second_bos():
    text, ids = encode_chat(_Tok(), [{"role": "user", "content": "hi"}])
    assert text == "<s><user>hi<assistant>"
    assert ids == [ord(c) for c in text]  # the template's own specials only: no BOS 1 added


def test_stop_search_and_hold_back():
    assert find_stop("abc STOP def", ["STOP"]) == (4, "STOP")
    assert find_stop("abc STOP def", ["STOP", "c S"]) == (2, "c S")  # the earliest wins
    assert find_stop("abcdefgh", ["bc"], prev_len=7) is None  # only the tail past len(stop) can match anew
    assert find_stop("text", []) is None
    assert stable_text("hello wor", ["world"]) == "hello"  # "wor" may start "world": 4 characters held
    assert stable_text("hello wor", ["world"], finished=True) == "hello wor"
    assert stable_text("caf\ufffd", []) == "caf"  # half a multi-byte character
    assert stable_text("ab", ["xyz"]) == ""


# ---------------------------------------------------------------------- offline and server paths agree
def _asgi_post(llm_paged, path: str, body: dict) -> str:
    """POST to an in-process server on the offline engine; the response body as text."""
    import httpx

    from kvserve.engine.async_llm import AsyncLLM
    from kvserve.server.app import build_app

    async def run() -> str:
        a = AsyncLLM(engine=llm_paged.engine)
        try:
            app = build_app(a, "smollm2-135m", shutdown_engine=False)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.post(path, json={"model": "smollm2-135m", **body}, timeout=120)
                assert r.status_code == 200, r.text
                return r.text
        finally:
            await asyncio.to_thread(a.shutdown)

    return asyncio.run(run())


def test_chat_encoding_is_the_same_offline_and_served(llm_paged, tokenizer):
    from kvserve import SamplingParams

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}]
    text, ids = encode_chat(llm_paged.get_tokenizer(), msgs)
    assert ids == tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    off = llm_paged.chat(msgs, SamplingParams(temperature=0, max_tokens=6))[0]
    assert off.prompt_token_ids == ids and off.prompt == text
    served = json.loads(_asgi_post(llm_paged, "/v1/chat/completions",
                                   {"messages": msgs, "max_tokens": 6, "temperature": 0}))
    assert served["usage"]["prompt_tokens"] == len(ids)
    assert served["choices"][0]["message"]["content"] == off.outputs[0].text


def test_stream_holds_back_what_the_engine_holds_back(llm_paged):
    """The server streams the engine's settled texts as they are: each text a client has seen is one the
    engine put out (the hold-back of ``stable_text``, not a second one on top), and the end is the same."""
    from kvserve import SamplingParams

    prompt = "Once upon a time, in a small village by the sea,"
    full = llm_paged.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = " " + " ".join(full.split()[4:6])  # two words from the middle: several tokens
    assert stop in full
    e = llm_paged.engine
    e.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    offline = []
    while e.has_unfinished_requests():
        offline += [o.outputs[0].text for o in e.step()]
    assert offline[-1] == full[:full.index(stop)]
    body = _asgi_post(llm_paged, "/v1/completions",
                      {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop], "stream": True})
    seen, text = [], ""
    for line in body.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: "):])["choices"]:
                text += choice["text"]
                seen.append(text)
    assert seen and seen[-1] == offline[-1]
    assert set(seen) <= set(offline), (seen, offline)
