"""KV tiers below the block pool: a host pool (tier 2) and a directory on disk (tier 3).

    tier 1  the block pool          (prefix tree: evicts LRU leaves when the pool runs short)
      | evicted full blocks go down, instead of being dropped
    tier 2  HostTier: CPU memory    (LRU within kv_offload_memory; what it evicts goes down again)
      |
    tier 3  DiskTier: a directory   (LRU by file time within kv_cache_dir_size; written through as
                                     soon as a block is computed, by a background thread)

A prefix match that ends in the tree goes on in the tiers: the request's next whole blocks are looked
up by key, copied up into new pool blocks and added to the tree, and only the rest is computed.

**Keys.** A block's key is a chained hash: sha256(parent key + this block's token ids), starting from
the model's identity (the model file's sha256, dtype, KV dtype, block size, KV layout). Equal keys mean
the same tokens after the same prefix under the same model and layout; a block of another model or
layout can never be read back.

**Disk format.** One safetensors file per block (``<key>.safetensors``: the K/V tensors of every
layer of every KV cache group, scales too when quantized; metadata: the identity). No pickle: a cache
directory cannot run code. Files are written to a temporary name, made 0600 and renamed, so another
process never sees half a file. A file that fails to load (corrupt, truncated, another model's, wrong
shapes) is skipped, counted and removed; its tokens are computed instead. A full or read-only disk
stops the writes (logged once); serving goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Data = list[torch.Tensor]  # what KVCache.copy_out gives for one block (every group, K/V, scales)


def model_identity(model_path: str | None, dtype: torch.dtype, kv_dtype: str, block_size: int, layout: str) -> str:
    """The hex sha256 under which this engine's blocks are keyed (the model file's bytes included)."""
    h = hashlib.sha256()
    if model_path and os.path.isfile(model_path):
        with open(model_path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    else:
        h.update(str(model_path).encode())
    h.update(f"|{dtype}|{kv_dtype}|{block_size}|{layout}".encode())
    return h.hexdigest()


def block_keys(identity: str, token_ids: list[int], block_size: int, known: list[str] | None = None) -> list[str]:
    """Chained keys of the whole blocks of ``token_ids``: key_i = sha256(key_{i-1} + tokens of block i).
    ``known``: keys already computed for a prefix of these tokens (a growing request), reused."""
    keys = list(known or [])[: len(token_ids) // block_size]
    parent = bytes.fromhex(keys[-1] if keys else identity)
    for i in range(len(keys), len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *block)).digest()
        keys.append(parent.hex())
    return keys


@dataclass
class TierStats:
    hits: int = 0  # blocks loaded up from this tier
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    stored: int = 0  # blocks written into it
    bytes_stored: int = 0
    evicted: int = 0  # blocks it dropped (LRU) for room
    corrupt: int = 0  # files skipped as unreadable or foreign (disk)
    write_errors: int = 0


def _nbytes(data: Data) -> int:
    return sum(t.numel() * t.element_size() for t in data)


class HostTier:
    """Blocks in CPU memory, least recently used out first, within ``capacity`` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.blocks: OrderedDict[str, Data] = OrderedDict()
        self.stats = TierStats()
        self.lock = threading.Lock()  # the prefetch thread puts blocks here too

    def __contains__(self, key: str) -> bool:
        return key in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, key: str, data: Data) -> list[tuple[str, Data]]:
        """Store a block; returns the blocks evicted for room (for the tier below)."""
        size, out = _nbytes(data), []
        if size > self.capacity:
            return [(key, data)]
        with self.lock:
            if key in self.blocks:
                self.blocks.move_to_end(key)
                return []
            while self.used + size > self.capacity and self.blocks:
                k, d = self.blocks.popitem(last=False)
                self.used -= _nbytes(d)
                self.stats.evicted += 1
                out.append((k, d))
            self.blocks[key] = data
            self.used += size
            self.stats.stored += 1
            self.stats.bytes_stored += size
        return out

    def get(self, key: str) -> Data | None:
        with self.lock:
            data = self.blocks.get(key)
            if data is not None:
                self.blocks.move_to_end(key)
            return data


class DiskTier:
    """One safetensors file per block in ``directory``, least recently used out first (by file time),
    within ``capacity`` bytes. Writes go through a background thread; reads are synchronous."""

    SUFFIX = ".safetensors"

    def __init__(self, directory: str, capacity: int, identity: str):
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity, self.identity = capacity, identity
        self.stats = TierStats()
        self.lock = threading.Lock()
        # key -> size, oldest first: what the directory held at start (a restart finds its prefixes), then
        # what this process writes; another process's new files are found when first looked up
        self.index: OrderedDict[str, int] = OrderedDict()
        files = sorted(self.dir.glob("*" + self.SUFFIX), key=lambda p: p.stat().st_mtime)
        for p in files:
            self.index[p.name.removesuffix(self.SUFFIX)] = p.stat().st_size
        self.used = sum(self.index.values())
        self.writable = True
        self._queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()  # queued, not yet on disk
        self._writer = threading.Thread(target=self._write_loop, name="kvserve-kv-disk", daemon=True)
        self._writer.start()

    def path(self, key: str) -> Path:
        return self.dir / (key + self.SUFFIX)

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending or self.path(key).exists()

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ writes (background thread)
    def put(self, key: str, data: Data) -> None:
        """Queue a block for writing (the caller's tensors must not change afterwards: pass copies)."""
        if not self.writable or key in self:
            return
        with self.lock:
            self._pending.add(key)
        self._queue.put((key, data))

    def flush(self) -> None:
        """Wait until every queued block is on disk (tests, shutdown)."""
        self._queue.join()

    def _write_loop(self) -> None:
        while True:
            key, data = self._queue.get()
            try:
                if self.writable:
                    self._write(key, data)
            except OSError as e:  # full or read-only disk: stop writing, keep serving
                self.writable = False
                self.stats.write_errors += 1
                log.warning("KV disk tier %s: %s; no more blocks will be written there", self.dir, e)
            finally:
                with self.lock:
                    self._pending.discard(key)
                self._queue.task_done()

    def _write(self, key: str, data: Data) -> None:
        from safetensors.torch import save_file

        tensors = {f"t{i}": t.contiguous() for i, t in enumerate(data)}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=self.SUFFIX)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"identity": self.identity, "key": key})
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path(key))  # atomic: readers see no file or the whole file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        size = self.path(key).stat().st_size
        with self.lock:
            self.index[key] = size
            self.used += size
            self.stats.stored += 1
            self.stats.bytes_stored += size
            while self.used > self.capacity and len(self.index) > 1:
                old, old_size = self.index.popitem(last=False)
                self.used -= old_size
                self.stats.evicted += 1
                self.path(old).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reads
    def get(self, key: str, like: Data) -> Data | None:
        """The block's tensors, checked against ``like`` (shapes and dtypes of this engine's blocks)
        and the identity; None (counted, file removed) when anything is off. The file is read in one
        go, so a writer that replaces or removes it meanwhile gives the old bytes or a miss."""
        from safetensors.torch import load

        p = self.path(key)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:  # never written, or another process evicted it: a miss
            with self.lock:
                self.used -= self.index.pop(key, 0)
            return None
        try:
            (n,) = struct.unpack("<Q", raw[:8])
            meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
            if meta.get("identity") != self.identity or meta.get("key") != key:
                raise ValueError("written under another model, layout or key")
            tensors = load(raw)
            data = [tensors[f"t{i}"] for i in range(len(like))]
            for got, want in zip(data, like):
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"shape {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}")
        except Exception as e:  # noqa: BLE001 - corrupt, truncated, foreign: skip and recompute
            self.stats.corrupt += 1
            log.warning("KV disk tier: skipping %s (%s)", p.name, e)
            with self.lock:
                self.used -= self.index.pop(key, 0)
            p.unlink(missing_ok=True)
            return None
        with self.lock:
            if key in self.index:
                self.index.move_to_end(key)
        try:
            os.utime(p)  # LRU across restarts: the index is rebuilt by file time
        except OSError:
            pass
        return data


@dataclass
class TieredStore:
    """The tiers below the pool, as the KV manager sees them."""

    identity: str
    host: HostTier | None = None
    disk: DiskTier | None = None
    write_through: bool = True  # with a disk tier: blocks go to disk as soon as they are computed
    _prefetch: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        if self.host is not None and self.disk is not None:
            threading.Thread(target=self._prefetch_loop, name="kvserve-kv-prefetch", daemon=True).start()

    def has(self, key: str) -> bool:
        return (self.host is not None and key in self.host) or (self.disk is not None and key in self.disk)

    def wants(self, key: str) -> bool:
        """Whether an evicted block needs copying out: not when its tier already holds it (with the
        write-through, a disk-only store holds every block it will ever get)."""
        if self.host is not None:
            return key not in self.host
        return self.disk is not None and key not in self.disk

    def evicted(self, key: str, data: Data) -> None:
        """A block the prefix tree gave up: into the host pool, and what that evicts onto the disk."""
        spill = self.host.put(key, data) if self.host is not None else [(key, data)]
        if self.disk is not None:
            for k, d in spill:
                self.disk.put(k, d)

    def computed(self, key: str, data: Data) -> None:
        """A block just computed in full: written through to the disk tier."""
        if self.disk is not None and self.write_through:
            self.disk.put(key, data)

    def load(self, key: str, like: Data) -> Data | None:
        """The block from the highest tier that has it (a disk hit is also kept in the host pool)."""
        t0 = time.perf_counter()
        if self.host is not None and (data := self.host.get(key)) is not None:
            tier = self.host
        elif self.disk is not None and (data := self.disk.get(key, like)) is not None:
            tier = self.disk
            if self.host is not None:
                self.evicted(key, data)
        else:
            return None
        tier.stats.hits += 1
        tier.stats.bytes_loaded += _nbytes(data)
        tier.stats.load_seconds += time.perf_counter() - t0
        return data

    def prefetch(self, keys: list[str], like: Data) -> None:
        """Start reading these blocks from disk into the host pool, in the background (a request was
        queued: its blocks are on their way before it is scheduled)."""
        if self.host is not None and self.disk is not None:
            todo = [k for k in keys if k not in self.host and k in self.disk]
            if todo:
                self._prefetch.put((todo, like))

    def _prefetch_loop(self) -> None:
        while True:
            keys, like = self._prefetch.get()
            for k in keys:
                if k not in self.host and (data := self.disk.get(k, like)) is not None:
                    self.evicted(k, data)

    def stats(self) -> dict:
        out = {}
        for name, tier in (("host", self.host), ("disk", self.disk)):
            if tier is None:
                continue
            for k, v in vars(tier.stats).items():
                out[f"kv_tier_{name}_{k}"] = v
            out[f"kv_tier_{name}_blocks"] = len(tier)
            out[f"kv_tier_{name}_bytes"] = tier.used
        return out
