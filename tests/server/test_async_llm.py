"""AsyncLLM in-process, on the session's offline engine (llm_paged): the AsyncLLM's thread owns it while a
test runs and hands it back, every request finished or aborted, at shutdown."""
from __future__ import annotations

import asyncio
import time

import pytest

from kvserve import SamplingParams
from kvserve.engine.async_llm import AsyncLLM, EngineShutdownError, QueueFullError
from tests.conftest import PROMPTS


@pytest.fixture
def make_async(llm_paged):
    made = []

    def make(**kw) -> AsyncLLM:
        a = AsyncLLM(engine=llm_paged.engine, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.shutdown()
        assert not a.is_alive()
    assert not llm_paged.engine.has_unfinished_requests()
    assert llm_paged.cache_stats()["blocks_used"] == 0


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


async def wait_for(pred, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_generate_streams_cumulative_outputs_equal_offline(make_async, llm_paged):
    refs = [o.outputs[0] for o in llm_paged.generate(PROMPTS[:3], greedy(8))]
    a = make_async()

    async def one(p):
        return [o async for o in a.generate(p, greedy(8))]

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in PROMPTS[:3])), 120)

    results = asyncio.run(run())
    for outs, ref in zip(results, refs):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths)  # cumulative
        assert outs[-1].outputs[0].token_ids == ref.token_ids
        assert outs[-1].outputs[0].text == ref.text
    assert a.stats()["num_unfinished"] == 0


def test_closing_the_generator_aborts_and_frees_blocks(make_async):
    a = make_async()

    async def run():
        gen = a.generate(PROMPTS[2], SamplingParams(max_tokens=400, ignore_eos=True))
        first = await gen.__anext__()
        assert not first.finished
        await wait_for(lambda: a.stats()["blocks_used"] > 0)
        steps = a.stats()["steps"]
        await gen.aclose()
        await wait_for(lambda: a.stats()["blocks_used"] == 0)
        return a.stats()["steps"] - steps

    steps_after_close = asyncio.run(run())
    assert steps_after_close <= 1  # the abort ran before the next step (one may have been under way)
    s = a.stats()
    assert s["num_aborted"] == 1 and s["num_unfinished"] == 0 and s["requests_running"] == 0


def test_cancelled_consumer_aborts(make_async):
    a = make_async()

    async def run():
        async def consume():
            async for _ in a.generate(PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await wait_for(lambda: a.stats()["generation_tokens"] > 0 and a.stats()["blocks_used"] > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: a.stats()["blocks_used"] == 0)

    asyncio.run(run())
    assert a.stats()["num_aborted"] == 1


def test_add_errors_are_raised_before_any_output(make_async, llm_paged):
    a = make_async()

    async def run():
        gen = a.generate([1] * 600, greedy(4))
        with pytest.raises(ValueError, match=r"maximum context length is 512 tokens.*600 input tokens"):
            await gen.__anext__()
        with pytest.raises(ValueError, match="empty"):
            await a.add_request([], greedy(4))

    asyncio.run(run())
    assert a.stats()["num_unfinished"] == 0


def test_queue_full(make_async):
    a = make_async(max_queue=2)

    async def run():
        s1 = await a.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
        s2 = await a.add_request(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
        with pytest.raises(QueueFullError):
            await a.add_request(PROMPTS[2], greedy(1))
        a.close(s1)  # done with one: there is room again
        s3 = await a.add_request(PROMPTS[2], greedy(1))
        outs = [o async for o in a.iterate(s3)]
        assert outs[-1].finished
        a.close(s2)

    asyncio.run(run())
    assert a.stats()["num_unfinished"] == 0


def test_abort_by_id_ends_the_stream_with_abort(make_async):
    a = make_async()

    async def run():
        outs = []

        async def consume():
            async for o in a.generate(PROMPTS[3], SamplingParams(max_tokens=400, ignore_eos=True), request_id="r1"):
                outs.append(o)

        task = asyncio.create_task(consume())
        await wait_for(lambda: len(outs) >= 2)
        a.abort("r1")
        await asyncio.wait_for(task, 30)
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) >= 2  # what it had so far is kept


def test_step_error_fails_the_requests_and_the_engine_goes_on(make_async, llm_paged, monkeypatch):
    a = make_async()
    engine = llm_paged.engine
    real_step = engine.step

    def boom():
        monkeypatch.setattr(engine, "step", real_step)  # fail once
        raise RuntimeError("injected failure")

    async def run():
        gen = a.generate(PROMPTS[0], greedy(4))
        monkeypatch.setattr(engine, "step", boom)
        with pytest.raises(RuntimeError, match="injected failure"):
            async for _ in gen:
                pass
        return [o async for o in a.generate(PROMPTS[0], greedy(4))]

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    assert a.stats()["num_errors"] == 1


def test_shutdown_aborts_in_flight_and_refuses_new_requests(make_async):
    a = make_async()

    async def run():
        outs = []

        async def consume():
            async for o in a.generate(PROMPTS[4], SamplingParams(max_tokens=400, ignore_eos=True)):
                outs.append(o)

        task = asyncio.create_task(consume())
        await wait_for(lambda: len(outs) >= 1)
        await asyncio.to_thread(a.shutdown)
        await asyncio.wait_for(task, 30)
        with pytest.raises(EngineShutdownError):
            await a.add_request(PROMPTS[0], greedy(1))
        return outs

    outs = asyncio.run(run())
    assert outs[-1].outputs[0].finish_reason == "abort"
    assert not a.is_alive()


def test_idle_time_touches_the_pool_and_leaves_requests_unchanged(llm_paged):
    """A fresh engine's pool is reserved, not touched. ``prefault=False``: requests touch only the blocks
    they get. By default the idle engine thread zeroes the rest, a slice at a time, until every page is
    touched; requests sent while it does so give the offline engine's tokens."""
    from tests.conftest import make_llm

    refs = [o.outputs[0].token_ids for o in llm_paged.generate(PROMPTS, greedy(8))]
    engine = make_llm(kv_cache="paged", num_kv_blocks=512).engine  # 368 MiB in fp32: 46 slices
    kv = engine.kv_cache
    assert kv.touched_bytes == kv.nbytes // 512  # the null block

    async def run(a: AsyncLLM, prompts: list[str]) -> list[list[int]]:
        async def one(p):
            return [o async for o in a.generate(p, greedy(8))][-1].outputs[0].token_ids

        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)

    lazy = AsyncLLM(engine=engine, prefault=False)
    try:
        assert asyncio.run(run(lazy, PROMPTS[:2])) == refs[:2]
        time.sleep(0.2)  # idle
        used = lazy.stats()["kv_bytes_touched"]
        assert kv.nbytes // 512 < used <= 8 * kv.nbytes // 512  # 2 short prompts: a few blocks
    finally:
        lazy.shutdown()
    a = AsyncLLM(engine=engine)  # requests at once, while the idle time before them has begun the pool
    try:
        assert asyncio.run(run(a, PROMPTS[2:])) == refs[2:]

        async def touched():
            return await wait_for(lambda: a.stats()["kv_bytes_touched"] == a.stats()["kv_bytes_allocated"], 60)

        asyncio.run(touched())
        assert kv.touched_bytes == kv.nbytes
        assert asyncio.run(run(a, PROMPTS[:2])) == refs[:2]  # prefix-cache hits on blocks it left alone
    finally:
        a.shutdown()
