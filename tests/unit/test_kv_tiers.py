"""KV tiers without a model: chained keys, the host pool's LRU, the disk store's files (atomic,
0600, safetensors), and every way a file can be bad: each one is skipped and counted, never read."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from kvserve.kv.tiers import DiskTier, HostTier, TieredStore, block_keys

ID = "ab" * 32
LIKE = [torch.empty(2, 16, 1, 8, device="meta"), torch.empty(2, 16, 1, 8, device="meta")]


def block(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 1, 8, generator=g), torch.randn(2, 16, 1, 8, generator=g)]


def test_keys_chain_the_prefix_and_the_identity():
    a = block_keys(ID, list(range(40)), 16)
    assert len(a) == 2  # whole blocks only
    b = block_keys(ID, list(range(32)) + [7] * 8, 16)
    assert a == b  # the same first 32 tokens
    c = block_keys(ID, [99] + list(range(1, 40)), 16)
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later key
    assert block_keys("cd" * 32, list(range(40)), 16)[0] != a[0]  # another model or layout


def test_host_pool_evicts_least_recently_used_and_hands_the_victims_down():
    one = sum(t.numel() * 4 for t in block(0))
    host = HostTier(3 * one)
    for i in range(3):
        assert host.put(f"k{i}", block(i)) == []
    assert host.get("k0") is not None  # k0 is now the most recently used
    out = host.put("k3", block(3))
    assert [k for k, _ in out] == ["k1"] and "k1" not in host and "k0" in host
    assert host.used == 3 * one and host.stats.evicted == 1


def test_disk_round_trip_is_exact_atomic_and_private(tmp_path):
    disk = DiskTier(str(tmp_path), 1 << 30, ID)
    data = block(1)
    disk.put("k1", data)
    disk.flush()
    p = tmp_path / "k1.safetensors"
    assert p.exists() and (p.stat().st_mode & 0o777) == 0o600
    assert not list(tmp_path.glob(".tmp-*"))
    got = disk.get("k1", LIKE)
    assert all(torch.equal(a, b) for a, b in zip(got, data))
    assert p.read_bytes()[8:9] == b"{"  # safetensors: an 8-byte length, then a JSON header; no pickle
    again = DiskTier(str(tmp_path), 1 << 30, ID)  # a restart finds it
    assert "k1" in again.index and again.get("k1", LIKE) is not None


def test_bad_files_are_skipped_counted_and_removed(tmp_path):
    disk = DiskTier(str(tmp_path), 1 << 30, ID)
    for k in ("good", "trunc", "junk", "foreign", "shape"):
        disk.put(k, block(3) if k != "shape" else [torch.zeros(2, 8, 1, 8), torch.zeros(2, 8, 1, 8)])
    disk.flush()
    raw = (tmp_path / "trunc.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(500))
    (tmp_path / "foreign.safetensors").unlink()
    other = DiskTier(str(tmp_path), 1 << 30, "ef" * 32)  # another model's identity, the same key
    other.put("foreign", block(3))
    other.flush()
    assert disk.get("good", LIKE) is not None
    for k in ("trunc", "junk", "foreign", "shape", "missing"):
        assert disk.get(k, LIKE) is None
    assert disk.stats.corrupt == 4  # a missing file is not corrupt, just absent
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["good.safetensors"]


def test_disk_limit_evicts_the_oldest_files(tmp_path):
    one = None
    disk = DiskTier(str(tmp_path), 10 << 30, ID)
    disk.put("a", block(0))
    disk.flush()
    one = (tmp_path / "a.safetensors").stat().st_size
    disk.capacity = 2 * one
    disk.put("b", block(1))
    disk.put("c", block(2))
    disk.flush()
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["b", "c"] and disk.stats.evicted == 1


def test_a_disk_that_fails_stops_the_writes_and_nothing_else(tmp_path):
    d = tmp_path / "gone"
    disk = DiskTier(str(d), 1 << 30, ID)
    store = TieredStore(ID, HostTier(1 << 20), disk)
    d.rmdir()  # writes now fail with a real OSError (as root, a read-only mode would not stop us)
    store.computed("k1", block(1))
    disk.flush()
    assert not disk.writable and disk.stats.write_errors == 1
    store.computed("k2", block(2))  # not even tried
    disk.flush()
    assert disk.stats.write_errors == 1
    store.evicted("k3", block(3))  # the host pool still works
    assert store.load("k3", LIKE) is not None


def test_two_processes_on_one_directory_never_read_half_a_file(tmp_path):
    """A writer process rewrites the same keys over and over while this process reads them: every read
    is a whole file (or none), never a corrupt one."""
    writer = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        from kvserve.kv.tiers import DiskTier
        from pathlib import Path
        disk = DiskTier({str(tmp_path)!r}, 1 << 30, {ID!r})
        for i in range(300):
            k = f"k{{i % 5}}"
            Path({str(tmp_path)!r}, k + ".safetensors").unlink(missing_ok=True)
            disk.index.pop(k, None)
            disk.put(k, [torch.full((2, 16, 1, 8), float(i)), torch.full((2, 16, 1, 8), float(i))])
            disk.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    reader = DiskTier(str(tmp_path), 1 << 30, ID)
    reads = 0
    while proc.poll() is None:
        for i in range(5):
            got = reader.get(f"k{i}", LIKE)
            if got is not None:
                reads += 1
                assert torch.equal(got[0], got[1]) and got[0].unique().numel() == 1
    assert proc.returncode == 0 and reads > 0 and reader.stats.corrupt == 0


def test_keys_extend_a_known_prefix():
    tokens = list(range(100))
    assert block_keys(ID, tokens, 16, known=block_keys(ID, tokens[:40], 16)) == block_keys(ID, tokens, 16)


def test_a_block_a_tier_already_holds_is_not_copied_out_again(tmp_path):
    host_store = TieredStore(ID, HostTier(1 << 20))
    assert host_store.wants("k1")
    host_store.evicted("k1", block(1))
    assert not host_store.wants("k1")
    disk = DiskTier(str(tmp_path), 1 << 30, ID)
    disk_store = TieredStore(ID, None, disk)
    disk_store.computed("k2", block(2))  # written through
    assert not disk_store.wants("k2") and disk_store.wants("k3")
