"""The offline API, in vLLM's shape: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

from kvserve.args import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.models.loader import DEFAULT_MODEL
from kvserve.prompts import PromptType, as_prompt_list, encode_chat, normalize_prompt
from kvserve.request import RequestOutput
from kvserve.sampling_params import SamplingParams


class LLM:
    """Load a model and its KV cache once; run batches of prompts through continuous batching.

    >>> llm = LLM("smollm2-135m")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text

    The keyword arguments are the fields of ``kvserve.args.EngineArgs`` (also the CLI's engine flags).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str | None = None,
        quantization: str | None = "auto",
        kv_cache: str = "paged",
        block_size: int = 16,
        kv_cache_memory: str | int | None = None,
        num_kv_blocks: int | None = None,
        kv_cache_dtype: str = "auto",
        enable_prefix_caching: bool | None = None,
        preemption_mode: str = "recompute",
        swap_space: str | int = "2GiB",
        kv_cache_policy: str = "full",
        num_sink_tokens: int = 4,
        sink_window: int | None = None,
        kv_offload_memory: str | int | None = None,
        kv_cache_dir: str | None = None,
        kv_cache_dir_size: str | int = "20GiB",
        kv_compression: str | dict | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        enable_chunked_prefill: bool = True,
        seed: int | None = None,
        tensor_parallel_size: int = 1,
    ):
        self.engine_args = EngineArgs(
            model=model, dtype=dtype, device=device, quantization=quantization, kv_cache=kv_cache,
            block_size=block_size, kv_cache_memory=kv_cache_memory, num_kv_blocks=num_kv_blocks,
            kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=enable_prefix_caching,
            preemption_mode=preemption_mode, swap_space=swap_space, kv_cache_policy=kv_cache_policy,
            num_sink_tokens=num_sink_tokens, sink_window=sink_window, kv_offload_memory=kv_offload_memory,
            kv_cache_dir=kv_cache_dir, kv_cache_dir_size=kv_cache_dir_size, kv_compression=kv_compression,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill, seed=seed, tensor_parallel_size=tensor_parallel_size)
        self.engine = LLMEngine(self.engine_args.create_engine_config())

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLM":
        return cls(**asdict(args))

    # ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop tensor-parallel workers, if any (also done at exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def cache_stats(self) -> dict:
        """Blocks total/free/used/cached, usage, preemptions, swapped blocks, prefix hits, queue sizes."""
        return self.engine.cache_stats()

    @property
    def prefix_cache(self):
        """The radix tree of cached prefixes (None unless prefix caching is on); ``.dump()`` prints it."""
        return self.engine.kv_manager.prefix_cache

    def dump_prefix_cache(self) -> str:
        """The prefix tree as text, with a preview of each node's tokens."""
        if self.prefix_cache is None:
            return "prefix caching is off"
        return self.prefix_cache.dump(self.engine.tokenizer.decode)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts. A progress bar with
        input/output tok/s shows for batches of more than one prompt (``use_tqdm`` forces it on or off).

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        """
        prompts = as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # Validate every prompt before any starts, so one bad prompt does not leave others half-run.
        checked = []
        for p, sp in zip(prompts, params):
            text, ids = normalize_prompt(p, self.engine.tokenizer)
            checked.append((text, self.engine.check_prompt(ids, sp)))
        order = [self.engine.add_request(text, sp, prompt_token_ids=ids) for (text, ids), sp in zip(checked, params)]
        return self._run(order, len(order) > 1 if use_tqdm is None else use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of messages) or several."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        encoded = [encode_chat(self.engine.tokenizer, c, add_generation_prompt) for c in convs]
        return self.generate([{"prompt": text, "prompt_token_ids": ids} for text, ids in encoded],
                             sampling_params, use_tqdm)

    # ------------------------------------------------------------------
    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        t0 = time.perf_counter()
        n_in = n_out = 0
        try:
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    if o.finished:
                        done[o.request_id] = o
                        n_in += len(o.prompt_token_ids)
                        n_out += sum(len(c.token_ids) for c in o.outputs)
                        if bar is not None:
                            dt = time.perf_counter() - t0
                            bar.set_postfix_str(f"input: {n_in / dt:.1f} tok/s, output: {n_out / dt:.1f} tok/s")
                            bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in order]
