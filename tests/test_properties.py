"""Property-based tests (hypothesis) of every op against its float64 reference (pyfast/reference):
cherryq_matmul, append_kv, decode_attention and sparse_decode_attention, on every backend that
runs here ("cpu"; "triton", in the interpreter on CPU-only machines; "cuda" with a GPU and a build
with the CUDA kernels).

Each example draws shapes (odd sizes, GQA ratios, block sizes, lengths, leading batch dims, empty
batches), strided layouts (permuted storage order, padded and stepped dims; the padding holds NaN,
so a kernel that reads outside the view fails), dtypes, magnitudes (10**e scalings over most of
each dtype's range, per tensor) and sometimes a NaN in the inputs (NaN in -> NaN out, at exactly the
reference's positions). Tensor data comes from torch generators seeded by a drawn integer.
derandomize=True: every run tests the same examples, so CI is deterministic. Tolerances: conftest.tol
(docs/design.md: fp32 1e-5 on the CPU and in the Triton interpreter, 3e-4 on GPUs; fp16/bf16 1e-2),
relative to the reference's norm however small (pyfast.testing.assert_close); caches written by
append_kv exactly.

Magnitudes are drawn where an fp32-accumulating kernel is well defined: attention scores
scale * q.k stay O(1) (q and k are scaled in opposite directions, or `scale` compensates), and
fp16 results that the reference itself cannot represent (inf) are skipped.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import HAS_TRITON, TRITON_INTERPRETED, backends, device_for, tol
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import pyfast
from pyfast.reference import cherryq as ref_cherryq
from pyfast.reference import sparse as ref_sparse
from pyfast.testing import assert_close
from pyfast.testing import cpu_isa, rel_tol

BUILD = pyfast.build_info()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAN = float("nan")

# Examples per backend: the interpreter runs Triton kernels in Python, so it gets fewer (and smaller
# shapes, see `small`). PYFAST_PROPERTY_SCALE=k runs k times as many (a deeper, slower search).
_SCALE = max(1, int(os.environ.get("PYFAST_PROPERTY_SCALE", "1")))
EXAMPLES = {name: n * _SCALE for name, n in {"cpu": 40, "cuda": 40, "triton": 12 if TRITON_INTERPRETED else 40}.items()}


def small(backend: str) -> bool:
    return backend == "triton" and TRITON_INTERPRETED


# NaN inputs and heads that keep no token (sparse budget 0) make the Triton interpreter (numpy) warn.
IGNORE_NAN_WARNINGS = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
                       pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]


def ignore_nan_warnings(test):
    for mark in IGNORE_NAN_WARNINGS:
        test = mark(test)
    return test


def run_examples(body, backend: str) -> None:
    """Run `body(data, backend)` on EXAMPLES[backend] derandomized hypothesis examples."""

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def check(data):
        body(data, backend)

    check()


# ---------------------------------------------------------------------------------------------
# Strided layouts
# ---------------------------------------------------------------------------------------------
def draw_layout(data, ndim: int, *, unit_last: bool, label: str):
    """None (contiguous) or (perm, pads, steps): storage dims in the order `perm` (outermost
    first), each logical dim padded by pads[i] and stepped by steps[i]. unit_last keeps the last
    dim innermost with step 1 (what a tensor the op writes must have)."""
    if ndim == 0 or not data.draw(st.booleans(), label=f"{label} strided"):
        return None
    if unit_last:
        perm = list(data.draw(st.permutations(range(ndim - 1)), label=f"{label} perm")) + [ndim - 1]
    else:
        perm = list(data.draw(st.permutations(range(ndim)), label=f"{label} perm"))
    pads = data.draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim), label=f"{label} pads")
    steps = data.draw(st.lists(st.sampled_from([1, 1, 2]), min_size=ndim, max_size=ndim), label=f"{label} steps")
    if unit_last:
        steps[-1] = 1
    return perm, pads, steps


def materialize(t: torch.Tensor, layout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, base): a view with `layout` holding t's values on `device`, and the storage it views
    (NaN outside the view for float tensors)."""
    if layout is None:
        base = t.to(device).clone()
        return base, base
    perm, pads, steps = layout
    shape = t.shape
    base = torch.full([(shape[p] + pads[p]) * steps[p] for p in perm], NAN if t.is_floating_point() else 0,
                      dtype=t.dtype, device=device)
    inv = [perm.index(i) for i in range(len(perm))]
    view = base.permute(inv)[tuple(slice(0, shape[i] * steps[i], steps[i]) for i in range(len(shape)))]
    assert view.shape == shape
    view.copy_(t)
    return view, base


def view_like(view: torch.Tensor, base: torch.Tensor, new_base: torch.Tensor) -> torch.Tensor:
    """The view of `new_base` (a copy of `base`) that `view` is of `base`."""
    return new_base.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


def randn(gen: torch.Generator, *shape, magnitude: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * magnitude).to(dtype)


def draw_seed(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))


# ---------------------------------------------------------------------------------------------
# cherryq_matmul
# ---------------------------------------------------------------------------------------------
# Exponents e of the 10**e scaling of x (and bias) per dtype; the weights get 10**ew with ew in
# W_EXP (their scales, zeros and cherries are fp16). fp16 x stays where x @ W fits fp16.
X_EXP = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-3, 3)}
W_EXP = (-5, 1)


def _cherryq_case(data, backend: str) -> None:
    device = device_for(backend)
    tiny = small(backend)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    bits = data.draw(st.sampled_from([2, 3, 4]), label="bits")
    group_size = data.draw(st.sampled_from([32, 64, 128, 256]), label="group_size")
    groups = data.draw(st.integers(1, 2 if tiny else 4), label="groups")
    k = groups * group_size
    n = data.draw(st.integers(1, 40 if tiny else 100), label="N")
    lead = data.draw(st.one_of(st.just(()), st.tuples(st.integers(0, 12)),
                               st.tuples(st.integers(0, 3), st.integers(0, 4))), label="leading dims")
    cherries = data.draw(st.sampled_from([None, 0, 1, 5]), label="cherries_per_row")
    e_x = data.draw(st.integers(*X_EXP[dtype]), label="x exponent")
    e_w = data.draw(st.integers(*W_EXP), label="weight exponent")
    spread = data.draw(st.sampled_from([0, 0, 3]), label="x spread (decades per element)")
    bias_dtype = data.draw(st.one_of(st.none(), st.just(dtype), st.sampled_from(DTYPES)), label="bias dtype")
    e_b = data.draw(st.integers(*X_EXP[bias_dtype]), label="bias exponent") if bias_dtype is not None else 0
    nan = data.draw(st.sampled_from([False, False, False, True]), label="NaN in x")
    x_layout = draw_layout(data, len(lead) + 1, unit_last=False, label="x")
    bias_layout = draw_layout(data, 1, unit_last=False, label="bias")
    gen = draw_seed(data)

    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen)) * 10.0**e_w
    qw = pyfast.cherryq_quantize(w, bits=bits, group_size=group_size, cherries_per_row=cherries)
    x = torch.randn(*lead, k, generator=gen) * 10.0**e_x
    if spread:
        x = x * 10.0 ** ((2 * torch.rand(x.shape, generator=gen) - 1) * spread)
    x = x.to(dtype)
    if nan and x.numel():
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = NAN
    bias = None if bias_dtype is None else randn(gen, n, magnitude=10.0**e_b, dtype=bias_dtype)
    note(f"x {tuple(x.shape)} {dtype} 1e{e_x} spread {spread}, W [{n}, {k}] 1e{e_w} bits {bits} gs {group_size}, "
         f"bias {bias_dtype} 1e{e_b}")

    ref = ref_cherryq.matmul(x, qw, bias)
    assume(not torch.isinf(ref).any())  # fp16 overflow of the exact result itself

    xv, _ = materialize(x, x_layout, device)
    bv = None if bias is None else materialize(bias, bias_layout, device)[0]
    out = pyfast.cherryq_matmul(xv, qw.to(device), bv, backend=backend)
    assert out.dtype == dtype and out.shape == (*lead, n) and out.device.type == device.type
    assert_close(out, ref, tol(dtype, backend))


@ignore_nan_warnings
@pytest.mark.parametrize("backend", backends("cherryq_matmul"))
def test_cherryq_matmul_properties(backend):
    run_examples(_cherryq_case, backend)


@pytest.mark.skipif(BUILD["cpu_isa"] != "avx512_vnni", reason="CPU without avx512_vnni")
@pytest.mark.parametrize("e_x, e_w", [(-30, -4), (-30, -5), (-30, -6)])
def test_cherryq_cpu_vnni_tiny_x_small_scales(e_x, e_w):
    """Minimized from test_cherryq_matmul_properties: x [1, 64] ~1e-30, weights ~10**e_w (fp16
    scales ~1e-5..1e-7). With the VNNI path's old cut-off (group max 2^-100) the step times the
    weight scale went subnormal: relative error 1e-5..1e-1 where the fp32 kernel stays at ~1e-6.
    From 2^-80 down such x goes to the fp32 kernel."""
    gen = torch.Generator().manual_seed(0)
    qw = pyfast.cherryq_quantize(torch.randn(16, 64, generator=gen) * 10.0**e_w, bits=4, group_size=64)
    x = torch.randn(1, 64, generator=gen) * 10.0**e_x
    ref = ref_cherryq.matmul(x, qw)
    with cpu_isa("avx512"):
        assert_close(pyfast.cherryq_matmul(x, qw, backend="cpu"), ref, rel_tol(torch.float32))  # the fp32 path
    assert_close(pyfast.cherryq_matmul(x, qw, backend="cpu"), ref, rel_tol(torch.float32))  # the VNNI path


@pytest.mark.skipif(BUILD["cpu_isa"] != "avx512_vnni", reason="CPU without avx512_vnni")
@pytest.mark.parametrize("scale", [1e-33, 1e-36, 1e-38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cherryq_cpu_vnni_tiny_group_max(scale, dtype):
    """x whose group max is below ~2^-104 on the VNNI path: the per-group reciprocal 2^22 / max
    overflowed to inf and the results were wrong, even in sign (relative error 1.6-3.2)."""
    gen = torch.Generator().manual_seed(0)
    qw = pyfast.cherryq_quantize(torch.randn(64, 256, generator=gen), bits=3, group_size=128)
    x = (torch.randn(2, 256, generator=gen) * scale).to(dtype)
    assert_close(pyfast.cherryq_matmul(x, qw, backend="cpu"), ref_cherryq.matmul(x, qw), rel_tol(dtype))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("m", [1, 12], ids=["gemv", "gemm"])
@pytest.mark.parametrize("view", ["step2", "column", "expand"])
def test_cherryq_triton_strided_bias(m, view):
    """Minimized from test_cherryq_matmul_properties: N = 2, K = 32, bias[::2] of a length-4 tensor
    gave y[:, 1] = NaN (the element between holds NaN) until the launcher copied a strided bias."""
    device = device_for("triton")
    gen = torch.Generator().manual_seed(0)
    qw = pyfast.cherryq_quantize(torch.randn(2, 32, generator=gen), bits=2, group_size=32).to(device)
    x = torch.randn(m, 32, generator=gen).to(device)
    bias = {"step2": lambda: torch.tensor([1.0, NAN, 2.0, NAN], device=device)[::2],
            "column": lambda: torch.randn(2, 3, generator=gen).to(device)[:, 0],
            "expand": lambda: torch.tensor([3.0], device=device).expand(2)}[view]()
    assert not bias.is_contiguous()
    assert_close(pyfast.cherryq_matmul(x, qw, bias, backend="triton"), ref_cherryq.matmul(x, qw, bias),
                 tol(torch.float32, "triton"))


# ---------------------------------------------------------------------------------------------
# Sparse decoding: shared problem builder
# ---------------------------------------------------------------------------------------------
# Exponents for the attention inputs, per dtype: q ~ 10**eq, k ~ 10**(delta - eq) (so q.k ~ 10**delta,
# and `scale` brings scale * q.k back to O(1)), v ~ 10**ev.
QK_EXP = {torch.float32: (20, 10), torch.bfloat16: (20, 10), torch.float16: (2, 1)}  # (|eq| max, |delta| max)
V_EXP = {torch.float32: 20, torch.bfloat16: 20, torch.float16: 4}


def draw_sizes(data, backend: str, *, gqa: bool = True):
    tiny = small(backend)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    b = data.draw(st.integers(1, 2 if tiny else 3), label="B")
    hkv = data.draw(st.integers(1, 2 if tiny else 3), label="Hkv")
    g = data.draw(st.integers(1, 3 if tiny else 4), label="G (Hq / Hkv)") if gqa else 1
    d = data.draw(st.integers(1, 80), label="D")
    block_size = data.draw(st.sampled_from([1, 4, 16, 32]), label="block_size")
    if tiny:
        tmax = data.draw(st.integers(1, 64), label="Tmax")
    else:  # long caches too: the CPU kernel splits a head's tokens in chunks of >= 256
        tmax = data.draw(st.one_of(st.integers(1, 64), st.integers(200, 600)), label="Tmax")
    return dtype, b, hkv, g, d, block_size, tmax


def block_means(k: torch.Tensor, lengths, block_size: int) -> torch.Tensor:
    """block_keys as append_kv keeps them: the float64 mean of every full block (cast), NaN past
    each sequence's full blocks (never read)."""
    b, h, tmax, d = k.shape
    nb = tmax // block_size
    bk = k[:, :, : nb * block_size].double().reshape(b, h, nb, block_size, d).mean(3).to(k.dtype)
    for i, length in enumerate(lengths):
        bk[i, :, length // block_size :] = NAN
    return bk


def _attention_problem(data, backend: str):
    device = device_for(backend)
    dtype, b, hkv, g, d, block_size, tmax = draw_sizes(data, backend)
    lengths = data.draw(st.lists(st.integers(1, tmax), min_size=b, max_size=b), label="cache_seqlens")
    eq_max, delta_max = QK_EXP[dtype]
    eq = data.draw(st.integers(-eq_max, eq_max), label="q exponent")
    delta = data.draw(st.integers(-delta_max, delta_max), label="q.k exponent")
    ek = max(-30, min(30, delta - eq))
    ev = data.draw(st.integers(-V_EXP[dtype], V_EXP[dtype]), label="v exponent")
    temperature = data.draw(st.sampled_from([1.0, 0.25, 4.0]), label="temperature")
    qk = 10.0 ** (eq + ek)
    scale = None if qk == 1.0 and temperature == 1.0 else temperature / (math.sqrt(d) * qk)
    nan = data.draw(st.sampled_from([None, None, None, "q", "k", "v"]), label="NaN in")
    layouts = {name: draw_layout(data, nd, unit_last=False, label=name)
               for name, nd in (("q", 3), ("k_cache", 4), ("v_cache", 4), ("block_keys", 4))}
    gen = draw_seed(data)

    q = randn(gen, b, hkv * g, d, magnitude=10.0**eq, dtype=dtype)
    k = randn(gen, b, hkv, tmax, d, magnitude=10.0**ek, dtype=dtype)
    v = randn(gen, b, hkv, tmax, d, magnitude=10.0**ev, dtype=dtype)
    if nan is not None:  # one NaN at a valid position
        i = int(torch.randint(b, (1,), generator=gen))
        t = int(torch.randint(lengths[i], (1,), generator=gen))
        {"q": q[i, 0], "k": k[i, 0, t], "v": v[i, 0, t]}[nan][0] = NAN
    for i, length in enumerate(lengths):  # what no kernel may read
        k[i, :, length:] = NAN
        v[i, :, length:] = NAN
    bk = block_means(k, lengths, block_size)
    n = torch.tensor(lengths, dtype=torch.int32)
    note(f"q {tuple(q.shape)} {dtype} 1e{eq}, k 1e{ek}, v 1e{ev}, scale {scale}, Tmax {tmax}, bs {block_size}, "
         f"NaN in {nan}")
    cpu = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=n, block_keys=bk, block_size=block_size, scale=scale)
    dev = {name: materialize(t, layouts[name], device)[0] for name, t in (("q", q), ("k_cache", k), ("v_cache", v),
                                                                           ("block_keys", bk))}
    dev.update(cache_seqlens=n.to(device), block_size=block_size, scale=scale)
    return cpu, dev


def _decode_case(data, backend: str) -> None:
    cpu, dev = _attention_problem(data, backend)
    ref = ref_sparse.decode_attention(cpu["q"], cpu["k_cache"], cpu["v_cache"], cpu["cache_seqlens"], scale=cpu["scale"])
    out = pyfast.decode_attention(dev["q"], dev["k_cache"], dev["v_cache"], dev["cache_seqlens"], scale=dev["scale"],
                                  backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, tol(ref.dtype, backend))


def _sparse_case(data, backend: str) -> None:
    cpu, dev = _attention_problem(data, backend)
    budget = dict(topk=data.draw(st.integers(0, 6), label="topk"),
                  sink_blocks=data.draw(st.integers(0, 3), label="sink_blocks"),
                  local_blocks=data.draw(st.integers(0, 3), label="local_blocks"))
    ref = ref_sparse.sparse_decode_attention(cpu["q"], cpu["k_cache"], cpu["v_cache"], cpu["cache_seqlens"],
                                             cpu["block_keys"], block_size=cpu["block_size"], scale=cpu["scale"],
                                             **budget)
    out = pyfast.sparse_decode_attention(dev["q"], dev["k_cache"], dev["v_cache"], dev["cache_seqlens"],
                                         dev["block_keys"], block_size=dev["block_size"], scale=dev["scale"],
                                         backend=backend, **budget)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, tol(ref.dtype, backend))


@ignore_nan_warnings
@pytest.mark.parametrize("backend", backends("decode_attention"))
def test_decode_attention_properties(backend):
    run_examples(_decode_case, backend)


@ignore_nan_warnings
@pytest.mark.parametrize("backend", backends("sparse_decode_attention"))
def test_sparse_decode_attention_properties(backend):
    run_examples(_sparse_case, backend)


# ---------------------------------------------------------------------------------------------
# append_kv
# ---------------------------------------------------------------------------------------------
def _append_case(data, backend: str) -> None:
    device = device_for(backend)
    dtype, b, hkv, _, d, block_size, tmax = draw_sizes(data, backend, gqa=False)
    tn = data.draw(st.integers(0, tmax), label="Tn")
    start = data.draw(st.lists(st.integers(0, tmax - tn), min_size=b, max_size=b), label="cache_seqlens before")
    e = data.draw(st.integers(-V_EXP[dtype], V_EXP[dtype]), label="exponent")
    nan = data.draw(st.sampled_from([False, False, False, True]), label="NaN in k_new")
    layouts = {name: draw_layout(data, 4, unit_last=written, label=name) for name, written in (
        ("k_cache", True), ("v_cache", True), ("block_keys", True), ("k_new", False), ("v_new", False))}
    gen = draw_seed(data)

    k = randn(gen, b, hkv, tmax, d, magnitude=10.0**e, dtype=dtype)
    v = randn(gen, b, hkv, tmax, d, magnitude=10.0**e, dtype=dtype)
    for i, length in enumerate(start):  # free slots hold NaN: a kernel that reads them fails
        k[i, :, length:] = NAN
        v[i, :, length:] = NAN
    bk = block_means(k, start, block_size)
    k_new = randn(gen, b, hkv, tn, d, magnitude=10.0**e, dtype=dtype)
    v_new = randn(gen, b, hkv, tn, d, magnitude=10.0**e, dtype=dtype)
    if nan and k_new.numel():
        k_new.view(-1)[int(torch.randint(k_new.numel(), (1,), generator=gen))] = NAN
    n = torch.tensor(start, dtype=torch.int32)
    note(f"cache {tuple(k.shape)} {dtype} 1e{e}, Tn {tn}, bs {block_size}")

    (kc, kb), (vc, vb), (bkc, bkb) = (materialize(t, layouts[name], device) for name, t in (
        ("k_cache", k), ("v_cache", v), ("block_keys", bk)))
    kn, vn = (materialize(t, layouts[name], device)[0] for name, t in (("k_new", k_new), ("v_new", v_new)))
    nd = n.to(device)
    # The reference on CPU copies of the whole storage (views at the same strides).
    refs = [(view, base, base.cpu().clone()) for view, base in ((kc, kb), (vc, vb), (bkc, bkb))]
    ref_views = [view_like(view, base, copy) for view, base, copy in refs]
    n_ref = n.clone()
    ref_sparse.append_kv(*ref_views, n_ref, k_new, v_new, block_size=block_size)

    pyfast.append_kv(kc, vc, bkc, nd, kn, vn, block_size=block_size, backend=backend)
    assert torch.equal(nd.cpu(), n_ref), f"cache_seqlens {nd.tolist()} != {n_ref.tolist()}"
    # Caches exact; block_keys exact on the CPU, within tolerance elsewhere (fp32 sum vs float64 mean).
    bk_tol = 0.0 if backend == "cpu" else tol(dtype, backend)
    for name, (_, base, copy), t in zip(("k_cache", "v_cache", "block_keys"), refs, (0.0, 0.0, bk_tol)):
        assert_close(base, copy, t, name)  # the whole storage: nothing written outside the view


@ignore_nan_warnings
@pytest.mark.parametrize("backend", backends("append_kv"))
def test_append_kv_properties(backend):
    run_examples(_append_case, backend)
