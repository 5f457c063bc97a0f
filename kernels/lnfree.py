"""Triton kernels for the LN-free linear layers: y [M, N] = epilogue(x [M, K] @ w [N, K]^T), fp32
accumulation, with the epilogue
    + bias [N], then GPT-2's tanh GELU (GELU=True) or + residual [M, N] (HAS_RESIDUAL=True).

_linear_epilogue_kernel: one [BM, BN] output tile per program, K in steps of BK on tensor cores
(tl.dot; float32 x uses 3xTF32, as kernels/cherryq.py, to stay within the fp32 tolerance); the
epilogue runs on the fp32 accumulator before the single store. GELU: 0.5 v (1 + tanh(c (v +
0.044715 v^3))) with tanh(u) = 1 - 2 / (1 + e^{2u}) (exp2 of 2u log2 e; saturates to +-1, NaN
stays NaN).

Launcher (x2d [M, K] and w with unit stride along K, any row stride; residual [M, N] unit stride
along N): linear_epilogue_triton. It allocates the output (x's dtype) and checks nothing:
torch.ops.pyfast.linear_bias_gelu / linear_bias_residual run the rules (pyfast/lnfree/ops.py)
first. Its plan (plan_linear_epilogue) is compiled ahead of time for sm_80 and sm_90 by
bench/triton_aot.py. Under TRITON_INTERPRET=1 bf16 tl.dot is not supported: operands are upcast
to fp32 there (UPCAST_DOT).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfast.kernels._utils import Launch, Target, run_plan

GELU_C2 = tl.constexpr(2.0 * 0.7978845608028654 * 1.4426950408889634)  # 2 sqrt(2/pi) log2(e): e^{2u} as exp2
NUM_STAGES = 3  # software-pipelining depth of the K loop (GPU only)


@triton.jit
def _linear_epilogue_kernel(
    x, w, bias, residual, y,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (i_m, i_n): output tile y[i_m*BM : +BM, i_n*BN : +BN] over the whole of K."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    p_x = x + o_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    p_w = w + o_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        b_x = tl.load(p_x + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0)  # [BM, BK]
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0)  # [BN, BK]
        if UPCAST_DOT:  # TRITON_INTERPRET only: no bf16 tl.dot there (triton-lang/triton#11584)
            b_x, b_w = b_x.to(tl.float32), b_w.to(tl.float32)
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        b_acc = tl.dot(b_x, tl.trans(b_w), acc=b_acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0).to(tl.float32)[None, :]
    if GELU:
        b_u = b_acc + 0.044715 * b_acc * b_acc * b_acc
        b_t = 1.0 - 2.0 / (1.0 + tl.exp2(b_u * GELU_C2))
        b_acc = 0.5 * b_acc * (1.0 + b_t)
    m_y = m_m[:, None] & m_n[None, :]
    if HAS_RESIDUAL:
        p_r = residual + o_m.to(tl.int64)[:, None] * stride_rm + o_n[None, :]
        b_acc += tl.load(p_r, mask=m_y, other=0).to(tl.float32)
    p_y = y + o_m.to(tl.int64)[:, None] * stride_ym + o_n[None, :]
    tl.store(p_y, b_acc.to(y.dtype.element_ty), mask=m_y)


def _config(M: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps): a 16-row tile for decode-sized M, 64 x 128 above; float32 (3xTF32,
    twice the operand bytes) takes a shorter BK. The interpreter gets small tiles (it is slow)."""
    if interpreted:
        return 16, 32, 32, 4
    half = dtype != torch.float32
    if M <= 16:
        return 16, 64, 128 if half else 64, 4
    return (64, 128, 64, 8) if half else (64, 128, 32, 8)


def plan_linear_epilogue(x2d, w, bias, residual, gelu: bool, *, target: Target) -> tuple[list[Launch], torch.Tensor]:
    """The launch of `linear_epilogue_triton` on `target` and its output y (see kernels/_utils.py)."""
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    M, K = x2d.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return [], y
    BM, BN, BK, num_warps = _config(M, x2d.dtype, target.interpreted)
    return [Launch(_linear_epilogue_kernel, (triton.cdiv(M, BM), triton.cdiv(N, BN)), (
        x2d, w, bias, residual, y, M, N, K, x2d.stride(0), w.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0),
    ), dict(HAS_BIAS=bias is not None, GELU=gelu, HAS_RESIDUAL=residual is not None,
            DOT_PRECISION="tf32x3" if x2d.dtype == torch.float32 else "tf32",
            UPCAST_DOT=target.interpreted and x2d.dtype == torch.bfloat16,
            BM=BM, BN=BN, BK=BK, num_warps=num_warps, num_stages=NUM_STAGES))], y


def linear_epilogue_triton(x2d, w, bias=None, residual=None, gelu: bool = False) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ w [N, K]^T (+ bias [N]), then gelu_tanh or (+ residual [M, N]).

    Example:
        >>> x = torch.randn(4, 768, device="cuda", dtype=torch.float16)
        >>> w, b = torch.randn(3072, 768, device="cuda", dtype=torch.float16), None
        >>> y = linear_epilogue_triton(x, w, b, gelu=True)                      # [4, 3072] fp16
    """
    return run_plan(plan_linear_epilogue, x2d.device, x2d, w, bias, residual, gelu)
