"""append_kv (write new tokens into the cache, refresh the block keys of filled blocks) on every
kernel backend (cpu, triton, cuda) against the float64 reference (pyfast/reference/sparse.py):
dtypes, block sizes, decode steps and chunks crossing block boundaries, strided caches and new
tokens, unaligned rows; the Triton launcher's overflow handling; opcheck. CUDA-graph capture of
a whole decode step: test_sparse_decode_attention.py. Bad input: tests/test_errors.py.

k_cache, v_cache and cache_seqlens must equal the reference exactly; block_keys (a mean) exactly
on the CPU and within the backend's tolerance on Triton and CUDA (fp32 sum vs float64 mean)."""

import pytest
import torch

import pyfast
from conftest import HAS_TRITON, backends, device_for, per_backend, tol
from pyfast._registry import REGISTRY
from pyfast.reference import sparse as ref
from pyfast.testing import assert_close
from sparse_cases import DTYPE_IDS, DTYPES, block_means, make_cache, randn, seqlens, shape_id

if HAS_TRITON:
    from pyfast.kernels import sparse as ks

OP = "append_kv"
NAMES = ("k_cache", "v_cache", "block_keys", "cache_seqlens")


def only(*names):
    """Parametrize `backend` over the named backends of the op (a backend-specific test)."""
    return pytest.mark.parametrize("backend", backends(OP, only=names))


def check_state(got, want, dtype, backend, what=""):
    for name, g, w in zip(NAMES, got, want):
        if name == "block_keys" and backend != "cpu":  # fp32 sum vs float64 mean: may differ in the last bit
            assert_close(g, w, tol(dtype, backend), f"{what}: {name}")
        else:
            assert torch.equal(g.cpu(), w.cpu()), f"{what}: {name} differs from the reference"


@pytest.mark.parametrize("backend", backends(OP))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_steps_match_reference(backend, dtype):
    """Decode steps and chunks that cross block boundaries, a Tn = 0 append among them."""
    dev = device_for(backend)
    b, hkv, tmax, d, bs = 3, 2, 50, 24, 8
    gen = torch.Generator().manual_seed(3)
    expect = [torch.randn(b, hkv, tmax, d, generator=gen).to(dtype) for _ in range(2)]
    expect += [torch.randn(b, hkv, tmax // bs, d, generator=gen).to(dtype), torch.tensor([0, 5, 7], dtype=torch.int32)]
    state = [t.to(dev, copy=True) for t in expect]
    for tn in (1, 9, 1, 16, 0, 3):
        kn = torch.randn(b, hkv, tn, d, generator=gen).to(dtype)
        vn = torch.randn(b, hkv, tn, d, generator=gen).to(dtype)
        pyfast.append_kv(*state, kn.to(dev), vn.to(dev), block_size=bs, backend=backend)
        ref.append_kv(*expect, kn, vn, block_size=bs)
    check_state(state, expect, dtype, backend)


@pytest.mark.parametrize("backend", backends(OP))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("block_size", [4, 5, 20])
def test_window_cache_and_token_major_new(backend, block_size, dtype):
    """A prefill that crosses block boundaries, Tn=1 decode steps, then a longer append; the
    cache is a window of a longer buffer and k_new is token-major (strided)."""
    dev = device_for(backend)
    b, hkv, tmax, d = 3, 2, 47, 40
    buf = torch.randn(b, hkv, tmax + 6, d, device=dev).to(dtype)
    k_cache = buf[:, :, 3 : 3 + tmax]
    v_cache = torch.randn(b, hkv, tmax, d, device=dev).to(dtype)
    bk = torch.randn(b, hkv, tmax // block_size, d, device=dev).to(dtype)
    n = seqlens(0, 3, 10, device=dev)
    r_k, r_v, r_bk, r_n = k_cache.clone(), v_cache.clone(), bk.clone(), n.clone()
    for tn in (9, 1, 1, 1, 1, 1, 1, 14):
        k_new = torch.randn(b, tn, hkv, d, device=dev).to(dtype).transpose(1, 2)
        v_new = torch.randn(b, hkv, tn, d, device=dev).to(dtype)
        pyfast.append_kv(k_cache, v_cache, bk, n, k_new, v_new, block_size=block_size, backend=backend)
        ref.append_kv(r_k, r_v, r_bk, r_n, k_new, v_new, block_size=block_size)
        assert torch.equal(n, r_n)
        assert torch.equal(k_cache, r_k) and torch.equal(v_cache, r_v)
        assert_close(bk, r_bk, tol(dtype, backend), "block_keys")
    assert n.tolist() == [29, 32, 39]
    empty, bk_before = torch.randn(b, hkv, 0, d, device=dev).to(dtype), bk.clone()
    pyfast.append_kv(k_cache, v_cache, bk, n, empty, empty, block_size=block_size, backend=backend)  # Tn = 0
    assert n.tolist() == [29, 32, 39] and torch.equal(k_cache, r_k) and torch.equal(bk, bk_before)


@only("cpu", "cuda")  # Triton: the two tests above (the interpreter is slow)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("D", [64, 128, 72, 59])
@pytest.mark.parametrize("tn", [1, 20])
def test_one_append_matches_reference(backend, tn, D, dtype):
    dev = device_for(backend)
    b, hkv, tmax, bs = 4, 3, 100, 16
    k = randn(b, hkv, tmax, D, dtype=dtype, seed=1)
    v = randn(b, hkv, tmax, D, dtype=dtype, seed=2)
    bk = randn(b, hkv, tmax // bs, D, dtype=dtype, seed=3)  # untouched where no block fills up
    n = torch.tensor([0, 5, 16, 100 - tn], dtype=torch.int32)  # the last one ends exactly at Tmax
    k_new = randn(b, hkv, tn, D, dtype=dtype, seed=4)
    v_new = randn(b, hkv, tn, D, dtype=dtype, seed=5)
    expect = [t.clone() for t in (k, v, bk, n)]
    ref.append_kv(*expect, k_new, v_new, block_size=bs)
    state = [t.to(dev, copy=True) for t in (k, v, bk, n)]
    pyfast.append_kv(*state, k_new.to(dev), v_new.to(dev), block_size=bs, backend=backend)
    check_state(state, expect, dtype, backend, f"Tn={tn} D={D}")


@only("cpu", "cuda")
def test_token_by_token_and_strided_cache(backend):
    # 40 single-token appends into a [B, Tmax, Hkv, D]-stored cache; block size 7; k_new a slice.
    dev = device_for(backend)
    b, hkv, tmax, d, bs = 2, 2, 64, 64, 7
    dtype = torch.bfloat16
    kc = randn(b, tmax, hkv, d, dtype=dtype, seed=1, device=dev).transpose(1, 2)
    vc = randn(b, tmax, hkv, d, dtype=dtype, seed=2, device=dev).transpose(1, 2)
    bk = randn(b, hkv, tmax // bs, d, dtype=dtype, seed=3, device=dev)
    n = seqlens(0, 3, device=dev)
    expect = [t.cpu().clone() for t in (kc, vc, bk, n)]
    for step in range(40):
        new = randn(b, hkv, 2, d, dtype=dtype, seed=100 + step)
        k_new, v_new = new[:, :, :1], new[:, :, 1:]
        pyfast.append_kv(kc, vc, bk, n, k_new.to(dev), v_new.to(dev), block_size=bs, backend=backend)
        ref.append_kv(*expect, k_new, v_new, block_size=bs)
    check_state([kc, vc, bk, n], expect, dtype, backend, "token by token")


@only("cpu", "cuda")
def test_unaligned_rows(backend):
    # D = 64 views of rows of 65 elements (sliced on the device: .cuda() of such a view would pack
    # it): element copies instead of 16-byte vectors.
    dev = device_for(backend)
    b, hkv, tmax, d, bs = 2, 2, 48, 64, 16
    dtype = torch.float16
    k_full, v_full = (randn(b, hkv, tmax, d + 1, dtype=dtype, seed=s) for s in (1, 2))
    kn_full = randn(b, hkv, 25, d + 1, dtype=dtype, seed=4)
    bk = randn(b, hkv, tmax // bs, d, dtype=dtype, seed=3)
    n = torch.tensor([10, 0], dtype=torch.int32)
    v_new = randn(b, hkv, 25, d, dtype=dtype, seed=5)
    expect = [k_full[..., :d].clone(), v_full[..., :d].clone(), bk.clone(), n.clone()]
    ref.append_kv(*expect, kn_full[..., 1:], v_new, block_size=bs)
    state = [k_full.to(dev)[..., :d], v_full.to(dev)[..., :d], bk.to(dev), n.to(dev)]
    assert state[0].stride(2) == d + 1
    pyfast.append_kv(*state, kn_full.to(dev)[..., 1:], v_new.to(dev), block_size=bs, backend=backend)
    check_state(state, expect, dtype, backend, "unaligned rows")


@only("cuda")
def test_cuda_append_overflow_is_rejected_without_writing(backend):
    dev = device_for(backend)
    k, v = (randn(2, 2, 32, 64, dtype=torch.float16, seed=s).to(dev) for s in (1, 2))
    bk = block_means(k, 16)
    n = torch.tensor([30, 4], dtype=torch.int32).to(dev)
    k_new = randn(2, 2, 3, 64, dtype=torch.float16, seed=3).to(dev)
    before = [t.clone() for t in (k, v, bk, n)]
    with pytest.raises(ValueError, match="cache_seqlens"):
        pyfast.append_kv(k, v, bk, n, k_new, k_new, block_size=16, backend=backend)
    with pytest.raises(ValueError, match="cache_seqlens"):  # the same rule and type from the raw op
        torch.ops.pyfast.append_kv(k, v, bk, n, k_new, k_new, 16)
    for t, t0 in zip((k, v, bk, n), before):
        assert torch.equal(t, t0), "a rejected append wrote to the cache"


@only("triton", "cuda")
def test_kernel_overflow_leaves_sequence_untouched(backend):
    """The kernel itself (no host check, as during graph capture): a sequence that would pass
    Tmax is neither written nor advanced; the others are appended."""
    dev = device_for(backend)
    b, hkv, tmax, d, bs = 2, 1, 12, 16, 4
    k_cache = torch.randn(b, hkv, tmax, d, device=dev)
    v_cache = torch.randn_like(k_cache)
    bk = torch.randn(b, hkv, tmax // bs, d, device=dev)
    n = seqlens(10, 2, device=dev)
    k_new, v_new = torch.randn(b, hkv, 3, d, device=dev), torch.randn(b, hkv, 3, d, device=dev)
    before = [t.clone() for t in (k_cache, v_cache, bk)]
    REGISTRY[OP].impls[backend](k_cache, v_cache, bk, n, k_new, v_new, bs)
    assert n.tolist() == [10, 5]
    for t, t0 in zip((k_cache, v_cache, bk), before):
        assert torch.equal(t[0], t0[0])
    assert torch.equal(k_cache[1, :, 2:5], k_new[1]) and torch.equal(v_cache[1, :, 2:5], v_new[1])
    assert_close(bk[1, :, 0], k_cache[1, :, :4].double().mean(1), 1e-6)


# backend -> [(B, Hkv, Tmax, D, dtype, block_size, lengths, Tn)]; lengths leave room for the
# several calls opcheck makes.
OPCHECK_CASES = {
    "cpu": [(2, 2, 40, 16, torch.float32, 4, [3, 30], 5)],
    "triton": [(2, 2, 24, 16, torch.float32, 4, [3, 0], 2)],
    "cuda": [(2, 2, 256, 64, torch.float16, 16, [3, 17], 2)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, OPCHECK_CASES, ids=shape_id))
def test_opcheck(backend, case):
    b, hkv, tmax, d, dtype, bs, lengths, tn = case
    dev = device_for(backend)
    k, v, bk, _ = make_cache(b, hkv, tmax, d, dtype, lengths=[tmax] * b, block_size=bs, poison=False, device=dev)
    n = seqlens(*lengths, device=dev)
    k_new = torch.randn(b, hkv, tn, d, device=dev).to(dtype)
    torch.library.opcheck(torch.ops.pyfast.append_kv.default, (k, v, bk, n, k_new, k_new.clone(), bs),
                          {"backend": backend})
