"""Tensor parallelism: one scheduler on rank 0, the model and its KV cache split by heads over N ranks.

    LLM("smollm2-135m", tensor_parallel_size=3)          # kvserve generate ... --tensor-parallel-size 3

The engine process is rank 0. It starts N - 1 worker processes (``spawn``), and all N join one
``torch.distributed`` group: gloo on the CPU, NCCL on CUDA (one GPU per rank). Each rank loads the
checkpoint and keeps its slice (``models.shard``): its query heads and the KV heads they use, and its
share of every MLP. Each rank's KV pool therefore holds only its heads' K/V, with the same block
layout and block ids as rank 0's: rank 0's scheduler and block manager decide for all of them.

Every step, rank 0 broadcasts the step (the ``SchedulerOutput``, which is plain data) together with
the cache operations its block manager did since the last step (zeroing new blocks, copy-on-write
copies), in order. Every rank replays the operations on its own pool and runs the layers; the
all-reduces inside the model (``Decoder._reduce``) keep the ranks in lock-step. Only rank 0 computes
the logits (the LM head is replicated) and samples.

Processes: the workers ignore Ctrl-C (rank 0 decides when they stop), ask the kernel to kill them
when rank 0 dies (``PR_SET_PDEATHSIG``), and are pinned to their share of the cores. ``shutdown``
(also run at exit) stops them and leaves the process group, so a later engine can make a new one. A
worker that dies makes rank 0's next collective fail; rank 0 then raises an error that names it.

Not under tensor parallelism yet (refused with a message): swap preemption and the KV tiers (both
move blocks' data through rank 0's host memory, and each rank's share would have to travel too), and
KV compression (its scores would need the heads of every rank).
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import logging
import os
import signal
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.engine.batch import SchedulerOutput
from kvserve.engine.model_runner import ModelRunner

log = logging.getLogger("kvserve")

TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer than this fails (a hung rank)


@dataclass
class WorkerSpec:
    """What a worker needs to build its slice: the engine's config and rank 0's decisions."""

    config: object  # EngineConfig
    rank: int
    world: int
    address: str  # tcp://127.0.0.1:port of rank 0's rendezvous
    dtype: torch.dtype  # of the weights and activations, as rank 0 resolved "auto"
    kv_quant: str | None  # the KV cache's quantized format, or None (the model dtype)
    num_blocks: int
    block_size: int
    max_model_len: int
    cpus: list[int]


def cpu_shares(world: int) -> list[list[int]]:
    """The cores of each rank: an equal share of the ones this process may use (rank 0 first); with
    fewer cores than ranks, ranks share."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // world)
    return [cores[r * per : (r + 1) * per] or [cores[r % len(cores)]] for r in range(world)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (rank 0's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class MirroredKV:
    """Rank 0's KV pool, as its block manager sees it: every operation that changes blocks outside a
    forward pass is done here and also written down, for the workers to replay before the next step.
    Everything else is the pool itself."""

    def __init__(self, kv, ops: list):
        self._kv, self._ops = kv, ops

    def zero_new(self, block_ids: list[int]) -> None:
        self._ops.append(("zero_new", (list(block_ids),)))
        self._kv.zero_new(block_ids)

    def copy_block(self, src: int, dst: int) -> None:
        self._ops.append(("copy_block", (src, dst)))
        self._kv.copy_block(src, dst)

    def copy_out(self, block_ids):
        raise RuntimeError("tensor parallelism: moving blocks' data out of the pool (swap, KV tiers) is not supported")

    copy_in = copy_out

    def __getattr__(self, name: str):
        return getattr(self._kv, name)


class ParallelRunner(ModelRunner):
    """Rank 0's model runner: sends each step to the workers, then runs its own slice."""

    def __init__(self, model, attn, group: "TensorParallel"):
        super().__init__(model, attn)
        self.group = group

    def execute(self, out: SchedulerOutput, logits: bool = True) -> torch.Tensor | None:
        self.group.send(("step", out))
        try:
            return super().execute(out, logits)
        except RuntimeError as e:  # a collective failed: most likely a worker is gone
            self.group.raise_if_dead(e)
            raise


class TensorParallel:
    """The worker processes and the process group, seen from rank 0."""

    def __init__(self, config, world: int, device: torch.device, dtype: torch.dtype, kv_quant: str | None,
                 num_blocks: int, block_size: int, max_model_len: int):
        self.world, self.device = world, device
        self.ops: list = []  # cache operations since the last step (MirroredKV)
        shares = cpu_shares(world)
        address = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.workers = []
        for r in range(1, world):
            spec = WorkerSpec(config, r, world, address, dtype, kv_quant, num_blocks, block_size, max_model_len, shares[r])
            p = ctx.Process(target=worker_main, args=(spec,), name=f"kvserve-tp{r}", daemon=True)
            p.start()
            self.workers.append(p)
        self.closed = False
        atexit.register(self.shutdown)
        self._threads = torch.get_num_threads()  # given back at shutdown
        torch.set_num_threads(len(shares[0]))
        try:
            dist.init_process_group(_backend(device), init_method=address, rank=0, world_size=world, timeout=TIMEOUT)
        except Exception:
            self.shutdown()
            raise
        log.info("tensor parallel: %d ranks (%s), cores per rank %s", world, _backend(device), shares)

    def mirror(self, kv) -> MirroredKV:
        return MirroredKV(kv, self.ops)

    def send(self, msg: tuple) -> None:
        """Broadcast one message, with the cache operations queued before it, to every worker."""
        ops, self.ops[:] = list(self.ops), []
        try:
            dist.broadcast_object_list([(msg, ops)], src=0)
        except RuntimeError as e:
            self.raise_if_dead(e)
            raise

    def raise_if_dead(self, cause: Exception) -> None:
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.workers) if not p.is_alive()]
        if dead:
            self.shutdown()
            raise RuntimeError("tensor-parallel worker " + ", ".join(f"rank {r} exited (code {c})" for r, c in dead)
                               + f"; the engine cannot continue ({cause})") from cause

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            if all(p.is_alive() for p in self.workers):
                try:
                    dist.broadcast_object_list([(("stop", None), [])], src=0)
                except RuntimeError:
                    pass
            dist.destroy_process_group()
        for p in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        torch.set_num_threads(self._threads)
        atexit.unregister(self.shutdown)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent (rank 0) dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_main(spec: WorkerSpec) -> None:
    """Rank ``spec.rank``: build the slice, then replay cache operations and run steps until told to stop."""
    from kvserve.attn import select_backend
    from kvserve.engine.llm_engine import resolve_device
    from kvserve.kv.spec import KVSpec
    from kvserve.kv.storage import KVCache
    from kvserve.models.loader import resolve_model
    from kvserve.models.shard import load_model

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    os.sched_setaffinity(0, spec.cpus)
    torch.set_num_threads(len(spec.cpus))
    config = spec.config
    device = rank_device(resolve_device(config.device), spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=spec.address, rank=spec.rank, world_size=spec.world,
                            timeout=TIMEOUT)
    _, model = load_model(resolve_model(config.model), spec.dtype, device, config.quantization, spec.max_model_len,
                          spec.rank, spec.world)
    kv_spec = KVSpec.from_model(model.cfg, spec.dtype, spec.kv_quant)
    kv = KVCache(kv_spec, spec.num_blocks, spec.block_size, device)
    runner = ModelRunner(model, select_backend(kv, model.cfg.num_heads))
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        (kind, payload), ops = box[0]
        for name, args in ops:
            getattr(kv, name)(*args)
        if kind == "stop":
            break
        runner.execute(payload, logits=False)
    dist.destroy_process_group()
