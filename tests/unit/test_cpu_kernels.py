"""The C++ paged-decode kernel against the same attention in plain PyTorch (random pools, no model)."""
import os

import pytest
import torch

from kvserve.models import cpu_kernels

pytestmark = pytest.mark.skipif(os.environ.get("KVSERVE_CPU_KERNELS") == "0", reason="CPU kernels turned off")


def random_case(seed: int, B: int, Hkv: int, G: int, D: int, bs: int, num_blocks: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    lens = torch.randint(1, 6 * bs, (B,), generator=g)
    n = int(-(-lens.max() // bs))
    table = torch.zeros(B, n, dtype=torch.long)  # padded with the null block 0
    free = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # no block shared, random places
    for b in range(B):
        nb = int(-(-lens[b] // bs))
        table[b, :nb] = torch.tensor([free.pop() for _ in range(nb)])
    q = torch.randn(B, Hkv, G, D, generator=g).to(dtype)
    return q, k, v, table, lens


def test_kernel_builds():
    assert cpu_kernels.available(), "the C++ kernel did not build (g++ and ninja are needed); see the log warning"


@pytest.mark.parametrize("B,Hkv,G,D,bs", [(1, 3, 3, 64, 16), (7, 3, 3, 64, 16), (5, 2, 4, 32, 8), (3, 1, 1, 64, 300)])
def test_paged_decode_matches_reference(B, Hkv, G, D, bs):
    q, k, v, table, lens = random_case(B * 100 + bs, B, Hkv, G, D, bs, num_blocks=64, dtype=torch.float32)
    out = cpu_kernels.paged_decode(q, k, v, table, lens)
    ref = cpu_kernels.paged_decode_reference(q, k, v, table, lens)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_long_request_cut_into_pieces(dtype):
    """Batch 1 with 3 KV heads on 2 threads: the request's blocks are cut into pieces with their own
    softmax states, merged at the end. q is a view of a wider row (as the qkv product gives it) and
    comes back in its own dtype (fp16 through fp32)."""
    g = torch.Generator().manual_seed(7)
    bs, Hkv, G, D = 16, 3, 3, 64
    k = torch.randn(64, bs, Hkv, D, generator=g).to(dtype)
    v = torch.randn(64, bs, Hkv, D, generator=g).to(dtype)
    table = (torch.randperm(63, generator=g) + 1)[None, :39]
    lens = torch.tensor([613])
    qkv = torch.randn(1, (Hkv * G + 2 * Hkv) * D, generator=g).to(dtype)
    q = qkv[:, : Hkv * G * D].view(1, Hkv, G, D)
    out = cpu_kernels.paged_decode(q, k, v, table, lens)
    assert out.dtype == dtype
    ref = cpu_kernels.paged_decode_reference(q.float(), k.float(), v.float(), table, lens)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_stale_values_past_the_length_are_ignored():
    q, k, v, table, lens = random_case(1, 4, 3, 3, 64, 16, num_blocks=64, dtype=torch.float32)
    before = cpu_kernels.paged_decode(q, k, v, table, lens)
    for b in range(4):  # scribble over every slot past each request's length, in its last block
        last, used = table[b, (lens[b] - 1) // 16], (lens[b] - 1) % 16 + 1
        k[last, used:] = 1e4
        v[last, used:] = float("nan")
    torch.testing.assert_close(cpu_kernels.paged_decode(q, k, v, table, lens), before)


def test_bf16_cache():
    q, k, v, table, lens = random_case(3, 6, 3, 3, 64, 16, num_blocks=64, dtype=torch.bfloat16)
    out = cpu_kernels.paged_decode(q, k, v, table, lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), cpu_kernels.paged_decode_reference(q, k, v, table, lens).float(),
                               atol=2e-2, rtol=2e-2)



@pytest.mark.parametrize("B,Hkv,G,D,bs", [(1, 1, 4, 256, 16), (6, 3, 3, 64, 16), (4, 1, 4, 256, 8)])
def test_sliding_window_sees_keys_from_begin(B, Hkv, G, D, bs):
    """Each request sees keys [begins, lens) (a sliding window): equal to the masked reference, and the
    blocks wholly before the window are never read (NaN there changes nothing), so they may be freed."""
    q, k, v, table, lens = random_case(B * 7 + bs, B, Hkv, G, D, bs, num_blocks=64, dtype=torch.float32)
    g = torch.Generator().manual_seed(B)
    begins = (torch.rand(B, generator=g) * lens).long()
    begins[0] = max(0, int(lens[0]) - 2 * bs + 3)  # one starting inside a block past the first
    out = cpu_kernels.paged_decode(q, k, v, table, lens, begins)
    torch.testing.assert_close(out, cpu_kernels.paged_decode_reference(q, k, v, table, lens, begins), atol=2e-5, rtol=1e-4)
    for b in range(B):
        for j in range(int(begins[b]) // bs):
            k[table[b, j]] = float("nan")
            v[table[b, j]] = float("nan")
    torch.testing.assert_close(cpu_kernels.paged_decode(q, k, v, table, lens, begins), out)

# ---- the per-token ops: each C++ pass against the PyTorch lines it replaces (layers.py's slow path) ----

def test_rms_norm_and_fused_residual_add():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 576, generator=g) * 3
    delta = torch.randn(37, 576, generator=g)
    w = torch.rand(576, generator=g) + 0.5
    ref = torch.nn.functional.rms_norm(h, (576,), w, 1e-5)
    torch.testing.assert_close(cpu_kernels.kernel("rms_norm")(h, w, 1e-5), ref, atol=1e-6, rtol=1e-5)
    strided = torch.randn(37, 1000, generator=g)[:, :576]  # rows with a stride (a slice of a wider tensor)
    torch.testing.assert_close(cpu_kernels.kernel("rms_norm")(strided, w, 1e-5),
                               torch.nn.functional.rms_norm(strided, (576,), w, 1e-5), atol=1e-6, rtol=1e-5)
    h2 = h.clone()
    out = cpu_kernels.kernel("add_rms_norm")(h2, delta, w, 1e-5)
    torch.testing.assert_close(h2, h + delta)  # the residual stream is updated in place
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(h + delta, (576,), w, 1e-5), atol=1e-6, rtol=1e-5)


def test_silu_and_mul_over_a_wide_range():
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(9, 2 * 1536, generator=g) * 20  # far into both tails of the sigmoid
    gu[0, :4] = torch.tensor([0.0, -100.0, 100.0, -1e-30])
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.kernel("silu_and_mul")(gu), torch.nn.functional.silu(gate) * up,
                               atol=1e-5, rtol=1e-5)


def test_rotary_in_place_matches_rotate_half():
    from kvserve.models.layers import Rotary, apply_rotary

    rot = Rotary(64, 10000.0, 2048, torch.float32)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(11, (9 + 3 + 3) * 64, generator=g)
    positions = torch.randint(0, 2048, (11,), generator=g)
    qk = qkv[:, : 12 * 64].view(11, 12, 64)  # a strided view, as in the decoder
    ref = apply_rotary(qk.clone(), rot.cos[positions].unsqueeze(1), rot.sin[positions].unsqueeze(1))
    v_before = qkv[:, 12 * 64 :].clone()
    cpu_kernels.kernel("rotary_")(qk, rot.cos, rot.sin, positions)
    torch.testing.assert_close(qk, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv[:, 12 * 64 :], v_before, atol=0, rtol=0)  # v untouched


def test_bf16_per_token_ops_round_like_the_pytorch_chain():
    """In bf16 each C++ pass must round where the PyTorch reference (a chain of bf16 ops) rounds:
    at most one bf16 ulp apart (the RMSNorm mean is summed in another order), almost always equal."""
    from kvserve.models.layers import Rotary, apply_rotary

    bf = torch.bfloat16
    g = torch.Generator().manual_seed(3)

    def close(out, ref):
        assert out.dtype == bf and out.shape == ref.shape
        diff = (out.float() - ref.float()).abs()
        ulp = ref.float().abs().clamp(min=1e-30) * 2.0 ** -7
        assert bool((diff <= ulp).all()), float((diff / ulp).max())
        assert float((out != ref).float().mean()) < 0.01

    h = (torch.randn(23, 576, generator=g) * 3).to(bf)
    delta = torch.randn(23, 576, generator=g).to(bf)
    w = (torch.rand(576, generator=g) + 0.5).to(bf)
    ref_norm = lambda x: torch.nn.functional.rms_norm(x.float(), (576,), None, 1e-5).to(bf) * w  # noqa: E731
    close(cpu_kernels.kernel("rms_norm")(h, w, 1e-5), ref_norm(h))
    h2 = h.clone()
    out = cpu_kernels.kernel("add_rms_norm")(h2, delta, w, 1e-5)
    assert torch.equal(h2, h + delta)  # one bf16 rounding of the sum, as h.add_(delta)
    close(out, ref_norm(h + delta))

    gu = (torch.randn(9, 2 * 1536, generator=g) * 8).to(bf)
    gate, up = gu.chunk(2, dim=-1)
    close(cpu_kernels.kernel("silu_and_mul")(gu), torch.nn.functional.silu(gate) * up)

    rot = Rotary(64, 10000.0, 2048, bf)
    qkv = torch.randn(11, 15 * 64, generator=g).to(bf)
    positions = torch.randint(0, 2048, (11,), generator=g)
    qk = qkv[:, : 12 * 64].view(11, 12, 64)
    ref = apply_rotary(qk.clone(), rot.cos[positions].unsqueeze(1), rot.sin[positions].unsqueeze(1))
    cpu_kernels.kernel("rotary_")(qk, rot.cos, rot.sin, positions)
    close(qk, ref)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path):
    """torch's build lock is a plain file: a build killed midway leaves it, and torch then waits on it
    forever (a whole CI run was lost this way). Under our flock it is known to be stale and removed."""
    (tmp_path / "lock").write_text("")
    assert cpu_kernels._locked_build(str(tmp_path), lambda: "built") == "built"
    assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for(tmp_path):
    """While another live process holds the build flock, a second build waits for it to finish."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(1.5)"), str(tmp_path / "kvserve.flock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    assert cpu_kernels._locked_build(str(tmp_path), lambda: "built") == "built"
    assert time.monotonic() - t0 > 0.5
    holder.wait()


def test_each_python_environment_builds_in_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a = cpu_kernels.build_directory("x")
    monkeypatch.setattr("sys.prefix", "/some/other/venv")
    b = cpu_kernels.build_directory("x")
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
