"""Hedgehog ops: hedgehog_feature_map, linear_attention, hedgehog_attention (with their backward
ops) and hedgehog_decode.

Each op is declared once in the op registry (pyfast/_registry.py) below: its rules (one helper per
concept), fake impl, autograd and backends. The public functions bind the Python arguments (the
(S, z) state tuple, defaults) and call the op. Implementations: "cpu" (csrc/hedgehog/*.cpp),
"cuda" (csrc/hedgehog/hedgehog_cuda.cu: the decode step, and the fused forward for window 0 in
float16 / bfloat16, see cuda_unsupported), "triton" (kernels/hedgehog.py, the window hybrid in
kernels/hedgehog_hybrid.py: the attention ops and their backward ops; the default on CUDA tensors
where the CUDA C++ kernel does not cover the arguments), "reference" (pyfast/reference/hedgehog.py, float64). The exact math and layouts:
pyfast/reference/hedgehog.py.

The attention ops always return (out, S, z): the final state, float32, one per sequence (or per
packed segment) and KV head; with window > 0 there is no state and S, z are empty.
"""

from __future__ import annotations

import contextlib

import math

import torch

from pyfast import _ops, _registry
from pyfast._validate import FLOAT_DTYPES, check_int, check_tensor, fail, fail_type
from pyfast.reference import hedgehog as reference

_F32 = (torch.float32,)
_INT32 = (torch.int32,)
_EMPTY_SHAPE = (0,)  # S and z of a windowed call, and the gradient of an absent argument


# ---------------------------------------------------------------------------------------------
# Rules (one helper per concept)
# ---------------------------------------------------------------------------------------------
def check_qkv(op: str, q, k, v, *, q_name="q", k_name="k") -> tuple[int, int, int, int, int, int, int]:
    """q [B, Hq, T, Dq], k [B, Hkv, T, Dq], v [B, Hkv, T, Dv] of one float dtype, Hq a multiple of
    Hkv. Returns (B, Hq, Hkv, T, Dq, Dv, G)."""
    check_tensor(op, q_name, q, dtypes=FLOAT_DTYPES, ndim=4)
    b, hq, t, d = q.shape
    if min(b, hq, d) < 1:
        fail(op, q_name, "[B, Hq, T, D] with B, Hq, D >= 1", f"shape {list(q.shape)}")
    check_tensor(op, k_name, k, dtypes=(q.dtype,), shape=(b, None, t, d))
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        fail(op, f"{k_name}.shape[1] (Hkv)", f"a divisor of Hq = {hq}", hkv)
    check_tensor(op, "v", v, dtypes=(q.dtype,), shape=(b, hkv, t, None))
    if v.shape[3] < 1:
        fail(op, "v", "[B, Hkv, T, Dv] with Dv >= 1", f"shape {list(v.shape)}")
    return b, hq, hkv, t, d, v.shape[3], hq // hkv


def check_feature_weights(op: str, prefix: str, weight, bias, heads: int, d: int, dtype, f: int | None = None) -> int:
    """{prefix}_weight [heads, D, F] and {prefix}_bias [heads, F] (or None) in the input's dtype;
    F given (the k side: as q's) or any. Returns F."""
    name = f"{prefix}_weight" if prefix else "weight"
    check_tensor(op, name, weight, dtypes=(dtype,), shape=(heads, d, f))
    f = weight.shape[2]
    if f < 1:
        fail(op, name, f"[{heads}, {d}, F] with F >= 1", f"shape {list(weight.shape)}")
    if bias is not None:
        check_tensor(op, f"{prefix}_bias" if prefix else "bias", bias, dtypes=(dtype,), shape=(heads, f))
    return f


def check_state(op: str, s0, z0, n: int, hkv: int, width: int, dv: int) -> None:
    """initial_S [N, Hkv, F', Dv] and initial_z [N, Hkv, F'] float32, both or neither."""
    if (s0 is None) != (z0 is None):
        fail(op, "initial_S and initial_z", "both given or both None", "only one of them")
    if s0 is not None:
        check_tensor(op, "initial_S", s0, dtypes=_F32, shape=(n, hkv, width, dv))
        check_tensor(op, "initial_z", z0, dtypes=_F32, shape=(n, hkv, width))


def check_cu_seqlens(op: str, cu_seqlens, b: int) -> int:
    """int32 [N + 1] with N >= 1, contiguous, and B == 1. Returns N, the number of sequences
    (B without cu_seqlens). Its values are checked by check_cu_seqlens_values."""
    if cu_seqlens is None:
        return b
    check_tensor(op, "cu_seqlens", cu_seqlens, dtypes=_INT32, ndim=1)
    if cu_seqlens.shape[0] < 2 or (cu_seqlens.shape[0] > 1 and cu_seqlens.stride(0) != 1):
        fail(op, "cu_seqlens", "a contiguous int32 [N + 1] with N >= 1", f"shape {list(cu_seqlens.shape)}")
    if b != 1:
        fail(op, "q.shape[0] (B)", "1 with cu_seqlens (sequences packed along T)", b)
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens_values(op: str, cu_seqlens, t: int) -> None:
    """cu_seqlens rises from 0 to T (non-decreasing): one device-to-host read."""
    if cu_seqlens is None:
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != t or any(a > c for a, c in zip(cu, cu[1:])):
        fail(op, "cu_seqlens", f"non-decreasing from 0 to T = {t}", cu if len(cu) <= 12 else f"{cu[:12]}...")


def check_scalars(op: str, eps: float, scale: float | None = None) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        fail(op, "eps", "a finite float >= 0", repr(eps))
    if scale is not None and not math.isfinite(scale):
        fail(op, "scale", "None or a finite float", repr(scale))


def check_window(op: str, window: int, causal: bool, s0, alpha, beta, hq: int) -> None:
    """window >= 0; window > 0 only causal and without an initial state; alpha, beta float32 [Hq]."""
    check_int(op, "window", window, minimum=0)
    if window > 0 and not causal:
        fail(op, "window", "0 with causal=False (the sliding window is causal)", window)
    if window > 0 and s0 is not None:
        fail(op, "initial_state", "None with window > 0 (the hybrid keeps no recurrent state)", "a state")
    for name, t in (("alpha", alpha), ("beta", beta)):
        if t is not None:
            check_tensor(op, name, t, dtypes=_F32, shape=(hq,))


# ---------------------------------------------------------------------------------------------
# The CUDA C++ kernels' coverage and the default rule on CUDA tensors
# ---------------------------------------------------------------------------------------------
CUDA_MAX_FEATURES = 256  # F of the CUDA C++ kernels (decode: one thread per feature)
CUDA_MAX_GRID_YZ = 65535  # their launchers put heads and sequences on grid axes y / z


def cuda_unsupported(op: str, args) -> tuple[type, str, str, object] | None:
    """Why the CUDA C++ kernel of `op` (hedgehog_attention or hedgehog_decode) does not take these
    schema-order arguments, as (exception type, argument, expected, got); None when it does. The
    fused forward is float16 / bfloat16 tensor-core code for window 0 (float32 stays exact on
    Triton; the window hybrid is Triton's)."""
    q, k, q_weight = args[0], args[1], args[3]
    f = q_weight.shape[2]
    if f > CUDA_MAX_FEATURES:
        return ValueError, "q_weight.shape[2] (F)", f"<= {CUDA_MAX_FEATURES} with backend='cuda'", f
    if op == DECODE:
        heads, grid = max(q.shape[0], k.shape[1]), "max(B, Hkv)"
    else:
        if q.dtype == torch.float32:
            return TypeError, "q", "float16 or bfloat16 with backend='cuda' (float32 runs on 'triton')", q.dtype
        if args[11] > 0:
            return ValueError, "window", "0 with backend='cuda' (the hybrid runs on 'triton')", args[11]
        n = q.shape[0] if args[15] is None else args[15].shape[0] - 1
        heads, grid = max(q.shape[1], n), "max(Hq, N)"
    if heads > CUDA_MAX_GRID_YZ:
        return ValueError, grid, f"<= {CUDA_MAX_GRID_YZ} with backend='cuda'", heads
    return None


def _cuda_kernel(op: str, entry: str):
    """The CUDA entry point `entry`, refusing (with the registry's error) what it does not cover."""
    kernel = _ops.kernel(entry)

    def run(*args):
        why = cuda_unsupported(op, args)
        if why is not None:
            exc, name, expected, got = why
            (fail_type if exc is TypeError else fail)(op, name, expected, got)
        return kernel(*args)

    return run


def _default_cuda(op: str, covers=lambda args: False):
    """backend=None on CUDA tensors for op `op`: its CUDA C++ kernel where the build has one that
    `covers` the arguments, else Triton (if `op` has it)."""

    def pick(*args):
        impls = _registry.REGISTRY[op].impls
        if "cuda" in impls and _ops.has_cuda_kernels() and covers(args):
            return "cuda"
        return "triton" if "triton" in impls else "cuda"

    return pick


def _triton(name: str):
    """The Triton launcher `name` of kernels/hedgehog.py (imported on first use: triton is optional)."""

    def launch(*args):
        from pyfast.kernels import hedgehog as launchers

        return getattr(launchers, name)(*args)

    return launch


# ---------------------------------------------------------------------------------------------
# hedgehog_feature_map
# ---------------------------------------------------------------------------------------------
FEATURE_MAP = "hedgehog_feature_map"


def _check_feature_map(x, weight, bias) -> None:
    check_tensor(FEATURE_MAP, "x", x, dtypes=FLOAT_DTYPES, ndim=4)
    if x.shape[3] < 1:
        fail(FEATURE_MAP, "x", "[B, H, T, D] with D >= 1", f"shape {list(x.shape)}")
    check_feature_weights(FEATURE_MAP, "", weight, bias, x.shape[1], x.shape[3], x.dtype)


def _feature_map_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)


def _feature_map_backward(ctx, grad):
    """Through u = x W + b and both softmaxes: du = p (g1 - <g1, p>) - n (g2 - <g2, n>)."""
    x, weight, bias = ctx.saved_tensors
    u = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())
    if bias is not None:
        u = u + bias.float()[None, :, None, :]
    f = u.shape[-1]
    p, n = torch.softmax(u, -1), torch.softmax(-u, -1)
    g1, g2 = grad.float()[..., :f], grad.float()[..., f:]
    du = p * (g1 - (g1 * p).sum(-1, keepdim=True)) - n * (g2 - (g2 * n).sum(-1, keepdim=True))
    dx = torch.einsum("bhtf,hdf->bhtd", du, weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = torch.einsum("bhtd,bhtf->hdf", x.float(), du).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = du.sum((0, 2)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db


FEATURE_MAP_OP = _registry.define(_registry.OpDef(
    name=FEATURE_MAP,
    schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    check=_check_feature_map,
    fake=lambda x, weight, bias: x.new_empty((*x.shape[:3], 2 * weight.shape[2])),
    autograd=_registry.Autograd(_feature_map_backward, _feature_map_setup),
    differentiable=("x", "weight", "bias"),
    impls={
        "cpu": _ops.kernel("hedgehog_feature_map_cpu"),
        "triton": _triton(FEATURE_MAP),
        "reference": reference.feature_map,
    },
    default_cuda=_default_cuda(FEATURE_MAP),
))


# ---------------------------------------------------------------------------------------------
# linear_attention, hedgehog_attention and their backward ops
# ---------------------------------------------------------------------------------------------
LINEAR = "linear_attention"
HEDGEHOG = "hedgehog_attention"
LINEAR_ARGS = "Tensor q, Tensor k, Tensor v, bool causal, float eps, Tensor? initial_S, Tensor? initial_z, " \
              "Tensor? cu_seqlens"
HEDGEHOG_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, Tensor? q_bias, Tensor? k_bias, "
                 "bool causal, float eps, Tensor? initial_S, Tensor? initial_z, int window, Tensor? alpha, "
                 "Tensor? beta, float? scale, Tensor? cu_seqlens")


def _check_linear(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens, *, op=LINEAR):
    b, hq, hkv, t, width, dv, _ = check_qkv(op, q, k, v)
    check_scalars(op, eps)
    n = check_cu_seqlens(op, cu_seqlens, b)
    check_state(op, initial_S, initial_z, n, hkv, width, dv)
    return n, hkv, width, dv


def _check_hedgehog(q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps, initial_S, initial_z, window,
                    alpha, beta, scale, cu_seqlens, *, op=HEDGEHOG):
    b, hq, hkv, t, d, dv, _ = check_qkv(op, q, k, v)
    f = check_feature_weights(op, "q", q_weight, q_bias, hq, d, q.dtype)
    check_feature_weights(op, "k", k_weight, k_bias, hkv, d, q.dtype, f)
    check_scalars(op, eps, scale)
    n = check_cu_seqlens(op, cu_seqlens, b)
    check_state(op, initial_S, initial_z, n, hkv, 2 * f, dv)
    check_window(op, window, causal, initial_S, alpha, beta, hq)
    return n, hkv, 2 * f, dv


def _state_shapes(q, v, n, hkv, width, dv, windowed: bool):
    if windowed:
        return q.new_empty(_EMPTY_SHAPE, dtype=torch.float32), q.new_empty(_EMPTY_SHAPE, dtype=torch.float32)
    return q.new_empty((n, hkv, width, dv), dtype=torch.float32), q.new_empty((n, hkv, width), dtype=torch.float32)


def _fake_linear(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens):
    n, hkv, width, dv = _check_linear(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens)
    return (v.new_empty((*q.shape[:3], dv)), *_state_shapes(q, v, n, hkv, width, dv, False))


def _fake_hedgehog(*args):
    n, hkv, width, dv = _check_hedgehog(*args)
    q, v, window = args[0], args[2], args[11]
    return (v.new_empty((*q.shape[:3], dv)), *_state_shapes(q, v, n, hkv, width, dv, window > 0))


def _reference_linear(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens):
    state = None if initial_S is None else (initial_S, initial_z)
    out, (s, z) = reference.linear_attention(q, k, v, causal=causal, eps=eps, initial_state=state,
                                             return_state=True, cu_seqlens=cu_seqlens)
    return out, s.float(), z.float()


def _reference_hedgehog(q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps, initial_S, initial_z, window,
                        alpha, beta, scale, cu_seqlens):
    kw = dict(causal=causal, eps=eps, window=window, alpha=alpha, beta=beta, scale=scale, cu_seqlens=cu_seqlens)
    if window > 0:
        out = reference.hedgehog_attention(q, k, v, q_weight, k_weight, q_bias, k_bias, **kw)
        return (out, *_state_shapes(q, v, 0, 0, 0, 0, True))
    state = None if initial_S is None else (initial_S, initial_z)
    out, (s, z) = reference.hedgehog_attention(q, k, v, q_weight, k_weight, q_bias, k_bias, initial_state=state,
                                               return_state=True, **kw)
    return out, s.float(), z.float()


@contextlib.contextmanager
def _autograd_below_autograd_key():
    """Record autograd inside an op implementation. The registry's autograd kernel redispatches
    below the Autograd key, so ops called from an implementation record no graph; the reference
    backward needs one (it is autograd of the float64 spec). Dropping the Autograd and
    ADInplaceOrView keys from this thread's exclude set, for this block only, restores it. Plain
    tensors flow through (torch.func.vjp's wrappers would trip opcheck's schema checker)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude - torch._C.DispatchKeySet(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _reference_backward(forward, tensors):
    """The backward op's reference: autograd of the float64 reference `forward` with respect to
    the forward arguments at positions `tensors` (an empty tensor for an absent one)."""

    def backward(grad_out, grad_S, grad_z, *args):
        present = [i for i in tensors if args[i] is not None]
        with _autograd_below_autograd_key():
            full = list(args)
            for i in present:
                full[i] = args[i].detach().double().requires_grad_()
            out, s, z = forward(*full)
            outs, seeds = [out.double()], [grad_out.double()]
            if grad_S is not None:
                outs += [s.double(), z.double()]
                seeds += [grad_S.double(), grad_z.double()]
            grads = torch.autograd.grad(outs, [full[i] for i in present], seeds, allow_unused=True)
        got = {i: (torch.zeros_like(args[i]) if g is None else g.to(args[i].dtype)) for i, g in zip(present, grads)}
        return tuple(got[i] if i in got else args[0].new_empty(_EMPTY_SHAPE) for i in tensors)

    return backward


def _cpu_backward(name: str):
    """The C++ backward entry point `name`, its undefined gradients (absent arguments) as empty tensors."""
    kernel = _ops.kernel(name)

    def backward(*args):
        return tuple(args[3].new_empty(_EMPTY_SHAPE) if g is None else g for g in kernel(*args))

    return backward


def _grad_fake(fwd_args, tensors):
    """Gradient outputs shaped like the forward's tensor arguments (empty where absent)."""
    q = fwd_args[0]
    return tuple(q.new_empty(_EMPTY_SHAPE) if t is None else torch.empty_like(t) for t in tensors)


LINEAR_TENSORS = (0, 1, 2, 5, 6)  # q, k, v, initial_S, initial_z: the arguments with gradients
HEDGEHOG_TENSORS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 12, 13)  # + q_weight, k_weight, q_bias, k_bias, alpha, beta


def _check_grads(op: str, grad_out, grad_S, grad_z, fwd_args, checked) -> None:
    """The backward op's extra rules: grad_out like out, grad_S / grad_z like S / z (or None)."""
    n, hkv, width, dv = checked
    q, v = fwd_args[0], fwd_args[2]
    check_tensor(op, "grad_out", grad_out, dtypes=(v.dtype,), shape=(*q.shape[:3], dv))
    if (grad_S is None) != (grad_z is None):
        fail(op, "grad_S and grad_z", "both given or both None", "only one of them")
    if grad_S is not None:
        check_tensor(op, "grad_S", grad_S, dtypes=_F32, shape=(n, hkv, width, dv))
        check_tensor(op, "grad_z", grad_z, dtypes=_F32, shape=(n, hkv, width))


def _define_attention(name: str, args_schema: str, check, fake, tensors, cpu_entry, ref_forward, differentiable,
                      cuda: dict | None = None):
    """The forward op `name` and its backward op `name`_backward (autograd of the forward calls the
    backward op with the forward's backend)."""
    n_out = len(tensors)
    bwd_name = f"{name}_backward"

    def check_bwd(grad_out, grad_S, grad_z, *fwd):
        _check_grads(bwd_name, grad_out, grad_S, grad_z, fwd, check(*fwd, op=bwd_name))

    backward_op = _registry.define(_registry.OpDef(
        name=bwd_name,
        schema=f"(Tensor grad_out, Tensor? grad_S, Tensor? grad_z, {args_schema}) -> ({', '.join(['Tensor'] * n_out)})",
        check=check_bwd,
        check_data=lambda *a: check_cu_seqlens_values(bwd_name, a[-1], a[3].shape[2]),
        fake=lambda grad_out, grad_S, grad_z, *fwd: _grad_fake(fwd, [fwd[i] for i in tensors]),
        impls={"cpu": _cpu_backward(f"{cpu_entry}_backward_cpu"), "triton": _triton(bwd_name),
               "reference": _reference_backward(ref_forward, tensors)},
        default_cuda=_default_cuda(bwd_name),
    ))

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[inputs[i] for i in tensors])

    def backward(ctx, grad_out, grad_S, grad_z):
        saved = iter(ctx.saved_tensors)
        fwd = [next(saved) if i in tensors else a for i, a in enumerate(ctx.inputs)]
        if grad_out is None:
            grad_out = torch.zeros(*fwd[0].shape[:3], fwd[2].shape[3], dtype=fwd[2].dtype, device=fwd[2].device)
        if grad_S is not None and grad_S.numel() == 0:
            grad_S = grad_z = None
        backend = getattr(ctx, "backend", None)  # the forward's, where the backward op has it (else its default)
        backend = backend if backend in backward_op.impls else None
        grads = backward_op.overload(grad_out, grad_S, grad_z, *fwd, backend=backend)
        result = [None] * len(fwd)
        for i, g in zip(tensors, grads):
            if fwd[i] is not None and ctx.needs_input_grad[i]:
                result[i] = g
        return tuple(result)

    return _registry.define(_registry.OpDef(
        name=name,
        schema=f"({args_schema}) -> (Tensor, Tensor, Tensor)",
        check=check,
        check_data=lambda *a: check_cu_seqlens_values(name, a[-1], a[0].shape[2]),
        fake=fake,
        autograd=_registry.Autograd(backward, setup_context),
        differentiable=differentiable,
        impls={"cpu": _ops.kernel(f"{cpu_entry}_cpu"), **(cuda or {}), "triton": _triton(name),
               "reference": ref_forward},
        default_cuda=_default_cuda(name, lambda args: cuda is not None and cuda_unsupported(name, args) is None),
    ))


LINEAR_OP = _define_attention(LINEAR, LINEAR_ARGS, _check_linear, _fake_linear, LINEAR_TENSORS, "linear_attention",
                              _reference_linear, ("q", "k", "v", "initial_S", "initial_z"))
HEDGEHOG_OP = _define_attention(HEDGEHOG, HEDGEHOG_ARGS, _check_hedgehog, _fake_hedgehog, HEDGEHOG_TENSORS,
                                "hedgehog_attention", _reference_hedgehog,
                                ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias", "initial_S", "initial_z",
                                 "alpha", "beta"), cuda={"cuda": _cuda_kernel(HEDGEHOG, "hedgehog_attention_cuda")})


# ---------------------------------------------------------------------------------------------
# hedgehog_decode
# ---------------------------------------------------------------------------------------------
DECODE = "hedgehog_decode"


def _check_decode(q, k, v, q_weight, k_weight, q_bias, k_bias, S, z, eps) -> None:
    op = DECODE
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=3)
    b, hq, d = q.shape
    if min(b, hq, d) < 1:
        fail(op, "q", "[B, Hq, D] with B, Hq, D >= 1", f"shape {list(q.shape)}")
    check_tensor(op, "k", k, dtypes=(q.dtype,), shape=(b, None, d))
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        fail(op, "k.shape[1] (Hkv)", f"a divisor of Hq = {hq}", hkv)
    check_tensor(op, "v", v, dtypes=(q.dtype,), shape=(b, hkv, None))
    dv = v.shape[2]
    f = check_feature_weights(op, "q", q_weight, q_bias, hq, d, q.dtype)
    check_feature_weights(op, "k", k_weight, k_bias, hkv, d, q.dtype, f)
    check_tensor(op, "S", S, dtypes=_F32, shape=(b, hkv, 2 * f, dv))
    check_tensor(op, "z", z, dtypes=_F32, shape=(b, hkv, 2 * f))
    for name, t in (("S", S), ("z", z)):
        if not t.is_contiguous():  # updated in place by the kernels as a dense array
            fail(op, name, "contiguous (it is updated in place)", f"strides {list(t.stride())}")
    check_scalars(op, eps)


def _reference_decode(q, k, v, q_weight, k_weight, q_bias, k_bias, S, z, eps):
    return reference.hedgehog_decode(q, k, v, q_weight, k_weight, q_bias, k_bias, state=(S, z), eps=eps)


DECODE_OP = _registry.define(_registry.OpDef(
    name=DECODE,
    schema="(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, Tensor? q_bias, Tensor? k_bias, "
           "Tensor(a!) S, Tensor(b!) z, float eps) -> Tensor",
    check=_check_decode,
    fake=lambda q, k, v, *rest: v.new_empty((*q.shape[:2], v.shape[2])),
    impls={"cpu": _ops.kernel("hedgehog_decode_cpu"), "cuda": _cuda_kernel(DECODE, "hedgehog_decode_cuda"),
           "reference": _reference_decode},
    default_cuda=_default_cuda(DECODE, lambda args: cuda_unsupported(DECODE, args) is None),
))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _unpack_state(op: str, state, name: str = "initial_state"):
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        fail_type(op, name, "None or an (S, z) tuple of tensors", type(state).__name__)
    return state[0], state[1]


def hedgehog_feature_map(x, weight, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """phi(x) = cat(softmax(x W_h + b_h), softmax(-(x W_h + b_h))) per head h: [B, H, T, 2F].

    x [B, H, T, D] (float32/float16/bfloat16), weight [H, D, F], bias [H, F] or None, in x's dtype.
    Differentiable in x, weight and bias.

    Example:
        >>> x, w = torch.randn(1, 2, 5, 16), torch.randn(2, 16, 8) * 0.1
        >>> phi = pyfast.hedgehog_feature_map(x, w)
        >>> phi.shape, bool(torch.allclose(phi.sum(-1), torch.full((1, 2, 5), 2.0)))
        (torch.Size([1, 2, 5, 16]), True)
    """
    return FEATURE_MAP_OP.call(x, weight, bias, backend=backend)


def linear_attention(q, k, v, *, causal: bool = True, eps: float = 1e-6, initial_state=None,
                     return_state: bool = False, cu_seqlens=None, backend: str | None = None):
    """Linear attention of non-negative features: out_t = q_t S_t / (q_t . z_t + eps) with
    S_t = S0 + sum_{s<=t} k_s^T v_s, z_t = z0 + sum_{s<=t} k_s (all s when causal=False).

    q [B, Hq, T, F], k [B, Hkv, T, F], v [B, Hkv, T, Dv] (Hq a multiple of Hkv: GQA); initial_state
    (S0 [N, Hkv, F, Dv], z0 [N, Hkv, F]) float32 or None; cu_seqlens int32 [N + 1] packs N
    sequences along T (B = 1). Returns out [B, Hq, T, Dv] in v's dtype, and with return_state
    (out, (S_T, z_T)). Differentiable in q, k, v and the initial state.

    Example:
        >>> q, k = torch.rand(1, 2, 6, 8), torch.rand(1, 2, 6, 8)
        >>> out, (S, z) = pyfast.linear_attention(q, k, torch.randn(1, 2, 6, 4), return_state=True)
        >>> out.shape, S.shape, z.shape
        (torch.Size([1, 2, 6, 4]), torch.Size([1, 2, 8, 4]), torch.Size([1, 2, 8]))
    """
    s0, z0 = _unpack_state(LINEAR, initial_state)
    out, s, z = LINEAR_OP.call(q, k, v, causal, eps, s0, z0, cu_seqlens, backend=backend)
    return (out, (s, z)) if return_state else out


def hedgehog_attention(q, k, v, q_weight, k_weight, q_bias=None, k_bias=None, *, causal: bool = True,
                       eps: float = 1e-6, initial_state=None, return_state: bool = False, window: int = 0,
                       alpha=None, beta=None, scale: float | None = None, cu_seqlens=None,
                       backend: str | None = None):
    """Hedgehog attention: linear attention of the learned feature maps of q and k, computed
    without writing the features to memory; with window > 0 (causal only) the LoLCATs hybrid of
    exact softmax over the last `window` keys and linear attention over the older ones.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; q_weight [Hq, D, F], k_weight [Hkv, D, F],
    biases [H, F] or None; alpha, beta float32 [Hq] (hybrid weights, default 1); scale defaults to
    1/sqrt(D); initial_state, return_state and cu_seqlens as in linear_attention (the state has
    2F features; no state with window > 0). Differentiable in every tensor argument.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
        >>> qw, kw = torch.randn(2, 16, 8) * 0.1, torch.randn(2, 16, 8) * 0.1
        >>> out = pyfast.hedgehog_attention(q, k, v, qw, kw)
        >>> out.shape
        torch.Size([1, 2, 10, 16])
    """
    s0, z0 = _unpack_state(HEDGEHOG, initial_state)
    if return_state and window:
        fail(HEDGEHOG, "return_state", "False with window > 0 (the hybrid keeps no recurrent state)", True)
    out, s, z = HEDGEHOG_OP.call(q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps, s0, z0, window,
                                 alpha, beta, scale, cu_seqlens, backend=backend)
    return (out, (s, z)) if return_state else out


def hedgehog_decode(q, k, v, q_weight, k_weight, q_bias=None, k_bias=None, *, state, eps: float = 1e-6,
                    backend: str | None = None) -> torch.Tensor:
    """One decode step: state = (S [B, Hkv, 2F, Dv], z [B, Hkv, 2F]) float32 is updated in place with
    the token's key and value, then out [B, Hq, Dv] = phi_q S / (phi_q . z + eps): the last row of
    hedgehog_attention over the whole sequence. q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv].

    Example:
        >>> qw, kw = torch.randn(2, 16, 8) * 0.1, torch.randn(2, 16, 8) * 0.1
        >>> S, z = torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16)
        >>> out = pyfast.hedgehog_decode(*(torch.randn(1, 2, 16) for _ in range(3)), qw, kw, state=(S, z))
        >>> out.shape
        torch.Size([1, 2, 16])
    """
    s, z = _unpack_state(DECODE, state, "state")
    if s is None:
        fail_type(DECODE, "state", "an (S, z) tuple of tensors", "None")
    return DECODE_OP.call(q, k, v, q_weight, k_weight, q_bias, k_bias, s, z, eps, backend=backend)
