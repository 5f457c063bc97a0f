"""Triton kernels for CherryQ: y [M, N] = x [M, K] @ dequant(W).T + bias, fp32 accumulation.

W [N, K] is stored as in `pyfast.cherryq.format` (the authoritative layout):
    qweight int32 [N, K//32*bits], scales/zeros float16 [N, G] (G = K // group_size),
    cherry_idx int32 [N, C], cherry_val float16 [N, C];
    W[n, k] = zeros[n, g] + code[n, k] * scales[n, g], cherries written over their columns
    (the packed code under a cherry is 0).

Kernels (each program unpacks its own slice of packed words with shifts and masks, see
`_load_codes`; nothing is dequantized to memory):
    _cherryq_gemv_kernel    small M (<= 8), CUDA cores, split-K over whole groups. Per group g it
                            accumulates D[m, n] = sum_k x[m, k] * code[n, k] and S[m] = sum_k x[m, k]
                            in fp32 and adds scales[n, g] * D + zeros[n, g] * S, so the inner loop
                            is only unpack + multiply-add. SPLIT_K > 1 writes fp32 partials to a
                            workspace [SPLIT_K, M, N] that _cherryq_splitk_reduce_kernel sums in a
                            fixed order (deterministic, no atomics) before bias and the cast.
    _cherryq_gemm_kernel    larger M, tensor cores: [BM, BN] output tile, K in steps of BK (BK
                            divides group_size, so one scale/zero per row per step); the [BN, BK]
                            weight tile is dequantized in fp32, rounded to x's dtype and fed to
                            tl.dot with an fp32 accumulator. float32 x uses 3xTF32 ("tf32x3"):
                            plain TF32 truncates x and W to 10 mantissa bits (~3e-4 relative,
                            biased), at the edge of the fp32 tolerance.
Both add the cherries in the same kernel as a rank-1 fix-up per cherry:
x[m, idx] * (cherry_val - zeros[n, idx // group_size]) (the dense part used code 0 there).
A program only adds the cherries whose column lies in the K range it owns, so indices outside
[0, K) are masked out and never dereferenced.

Launchers (x2d [M, K] with x2d.stride(1) == 1, any row stride; quantized tensors contiguous):
    cherryq_gemv_triton, cherryq_gemm_triton, cherryq_matmul_triton (picks by M).
They allocate the output (torch.empty, x's dtype) and check nothing: torch.ops.pyfast.cherryq_matmul
runs the op's rules (pyfast/cherryq/ops.py) before calling them. Each runs its plan
(plan_cherryq_gemv, ...: the launches as a pure function of metadata and the Target, see
kernels/_utils.py), which bench/triton_aot.py also compiles for sm_80 and sm_90. K (in_features),
bits, group size and block sizes are compile-time constants: one compiled variant per layer shape.

Under TRITON_INTERPRET=1 (CPU tensors) two interpreter gaps show: bf16 tl.dot is not supported
(the GEMM upcasts its operands to fp32 there, UPCAST_DOT), and fp32 -> bf16 casts truncate
instead of rounding to nearest, so bf16 outputs carry ~2x the GPU's rounding error.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from pyfast.kernels._utils import Launch, Target, run_plan

from pyfast.cherryq.format import PACK

# Codes per pack: every bit width stores 32 codes in `bits` int32 words (see format.py).
CODES_PER_PACK = tl.constexpr(PACK)
# Largest M served by the GEMV kernel; above it the tensor-core GEMM is used.
GEMV_MAX_M = 8
# Output columns per GEMV program and per split-K reduction program.
GEMV_BLOCK_N = 32
REDUCE_BLOCK_N = 128
# Software-pipelining depth of the GEMM K loop (GPU only).
GEMM_NUM_STAGES = 3


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _spread_codes(b_w, WIDTH: tl.constexpr):
    """Words [R, W] -> codes [R, W, 2, 2, ...] (32 // WIDTH per word, in bit order when flattened).

    Code i of a word is (w >> WIDTH*i) & (2**WIDTH - 1). Halving joins build it: join(w, w >> 16)
    holds shifts {0, 16}, joining that with itself >> 8 gives {0, 8, 16, 24}, and so on down to
    a shift of WIDTH; flattening the new axes row-major puts the code with shift WIDTH*i at i.
    The new axes stay inside one thread, so a thread unpacks whole words. Shifts add up to at
    most 31, so the arithmetic shift of int32 never mixes sign copies into the masked bits.
    """
    b_t = tl.join(b_w, b_w >> 16)
    b_t = tl.join(b_t, b_t >> 8)
    b_t = tl.join(b_t, b_t >> 4)
    if WIDTH <= 2:
        b_t = tl.join(b_t, b_t >> 2)
    if WIDTH == 1:
        b_t = tl.join(b_t, b_t >> 1)
    return b_t & ((1 << WIDTH) - 1)


@triton.jit
def _load_codes(p_qrow, k0, m_n, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Unpack the codes of the [BN, BK] weight tile of columns [k0, k0 + BK) (k0, BK multiples of 32).

    p_qrow: [BN, 1] pointers to the first word of each row's packed codes, rows masked by m_n [BN].
    Returns int32 codes [BN, BK] (0 on masked rows). Each word is loaded once ([BN, BK*BITS/32]
    words, contiguous per row) and unpacked in registers by `_spread_codes`.

    Bit layout of one pack of 32 codes c0..c31 (format.py), words w0.. of the pack:
        bits 4: w_j = | c[8j+7] | ... | c[8j+1] | c[8j] |       c[i] at bits 4*(i%8) .. +3
        bits 2: w_j = | c[16j+15] | ... | c[16j] |              c[i] at bits 2*(i%16) .. +1
        bits 3: w0, w1 = the low 2 bits of c0..c31 as for bits 2; w2 bit i = bit 2 of c[i]
    so for bits 2 and 4 the codes of consecutive words are consecutive columns, and for bits 3
    the same holds for the low plane (words 0, 1 of each pack) and the high plane (word 2).
    """
    o_w0 = k0 // CODES_PER_PACK * BITS  # first word of the tile in each row
    if BITS == 3:
        o_lo = tl.arange(0, BK // 16)  # low-plane words: 2 per pack, at pack*3 + {0, 1}
        o_hi = tl.arange(0, BK // CODES_PER_PACK)  # high-plane word: pack*3 + 2
        b_lo = tl.load(p_qrow + (o_w0 + (o_lo // 2) * 3 + o_lo % 2)[None, :], mask=m_n[:, None], other=0)
        b_hi = tl.load(p_qrow + (o_w0 + o_hi * 3 + 2)[None, :], mask=m_n[:, None], other=0)
        b_code = tl.reshape(_spread_codes(b_lo, 2), [BN, BK]) | (tl.reshape(_spread_codes(b_hi, 1), [BN, BK]) << 2)
    else:
        o_w = tl.arange(0, BK // CODES_PER_PACK * BITS)
        b_w = tl.load(p_qrow + (o_w0 + o_w)[None, :], mask=m_n[:, None], other=0)  # [BN, BK*BITS/32]
        b_code = tl.reshape(_spread_codes(b_w, BITS), [BN, BK])
    return b_code


@triton.jit
def _add_cherries(b_acc, p_xrow, m_m, cherry_idx, cherry_val, zeros, o_n, m_n, C, G, k_lo, k_hi,
                  GROUP_SIZE: tl.constexpr):
    """b_acc [BM, BN] += x[m, idx] * (cherry_val - zeros[n, idx // GROUP_SIZE]) for every cherry
    of the rows o_n whose column idx lies in [k_lo, k_hi); other indices are never dereferenced.

    p_xrow: [BM, 1] pointers to the rows of x; m_m [BM], m_n [BN] the row / column masks.
    """
    for c in range(0, C):
        b_idx = tl.load(cherry_idx + o_n * C + c, mask=m_n, other=-1)
        m_c = m_n & (b_idx >= k_lo) & (b_idx < k_hi)
        b_idx = tl.where(m_c, b_idx, 0)  # keeps even the (masked) addresses in bounds
        b_val = tl.load(cherry_val + o_n * C + c, mask=m_c, other=0).to(tl.float32)
        b_z = tl.load(zeros + o_n * G + b_idx // GROUP_SIZE, mask=m_c, other=0).to(tl.float32)
        b_xc = tl.load(p_xrow + b_idx[None, :], mask=m_m[:, None] & m_c[None, :], other=0).to(tl.float32)
        b_acc += b_xc * (b_val - b_z)[None, :]
    return b_acc


@triton.jit
def _store_output(b_acc, y, bias, o_m, m_m, o_n, m_n, stride_ym, HAS_BIAS: tl.constexpr):
    """y[o_m, o_n] = (b_acc + bias[o_n]) in y's dtype. b_acc [BM, BN] float32."""
    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0).to(tl.float32)[None, :]
    p_y = y + o_m.to(tl.int64)[:, None] * stride_ym + o_n[None, :]
    tl.store(p_y, b_acc.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cherryq_gemv_kernel(
    x, qweight, scales, zeros, cherry_idx, cherry_val, bias, out,
    M, N, C, stride_xm, stride_om, groups_per_split,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Program (i_n, i_s): output columns [i_n*BN, (i_n+1)*BN) of all M (<= BM) rows, groups
    [i_s*groups_per_split, ...) of K. SPLIT_K == 1: writes y (bias, cast). SPLIT_K > 1: writes the
    fp32 partial sum to out[i_s] (workspace [SPLIT_K, M, N]); bias is added by the reduction."""
    G: tl.constexpr = K // GROUP_SIZE
    QW_STRIDE: tl.constexpr = K // CODES_PER_PACK * BITS  # int32 words per row of qweight
    i_n, i_s = tl.program_id(0), tl.program_id(1)

    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_xrow = x + o_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    p_qrow = qweight + o_n[:, None] * QW_STRIDE  # [BN, 1]

    g_lo = i_s * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, G)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for g in range(g_lo, g_hi):
        b_d = tl.zeros([BM, BN], dtype=tl.float32)  # sum_k x * code over the group
        b_xs = tl.zeros([BM], dtype=tl.float32)  # sum_k x over the group
        for j in tl.static_range(GROUP_SIZE // BK):
            k0 = g * GROUP_SIZE + j * BK
            o_k = k0 + tl.arange(0, BK)
            b_x = tl.load(p_xrow + o_k[None, :], mask=m_m[:, None], other=0).to(tl.float32)  # [BM, BK]
            b_c = _load_codes(p_qrow, k0, m_n, BITS, BN, BK).to(tl.float32)  # [BN, BK]
            # [BM, 1, BK] * [1, BN, BK] -> sum over K -> [BM, BN]
            b_d += tl.sum(b_x[:, None, :] * b_c[None, :, :], axis=2)
            b_xs += tl.sum(b_x, axis=1)
        b_s = tl.load(scales + o_n * G + g, mask=m_n, other=0).to(tl.float32)
        b_z = tl.load(zeros + o_n * G + g, mask=m_n, other=0).to(tl.float32)
        b_acc += b_d * b_s[None, :] + b_xs[:, None] * b_z[None, :]

    b_acc = _add_cherries(b_acc, p_xrow, m_m, cherry_idx, cherry_val, zeros, o_n, m_n, C, G,
                          g_lo * GROUP_SIZE, g_hi * GROUP_SIZE, GROUP_SIZE)

    if SPLIT_K == 1:
        _store_output(b_acc, out, bias, o_m, m_m, o_n, m_n, stride_om, HAS_BIAS)
    else:
        p_ws = out + i_s * M * N + o_m[:, None] * N + o_n[None, :]
        tl.store(p_ws, b_acc, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _cherryq_splitk_reduce_kernel(
    ws, bias, y, M, N, stride_ym,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """y[:, n tile] = sum over the SPLIT_K partials of ws [SPLIT_K, M, N] (in order) + bias."""
    i_n = tl.program_id(0)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    p_ws = ws + o_m[:, None] * N + o_n[None, :]
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i_s in tl.static_range(SPLIT_K):
        b_acc += tl.load(p_ws + i_s * M * N, mask=m_mn, other=0)
    _store_output(b_acc, y, bias, o_m, m_m, o_n, m_n, stride_ym, HAS_BIAS)


@triton.jit
def _cherryq_gemm_kernel(
    x, qweight, scales, zeros, cherry_idx, cherry_val, bias, y,
    M, N, C, stride_xm, stride_ym,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Program (i_m, i_n): output tile y[i_m*BM : +BM, i_n*BN : +BN] over the whole of K."""
    G: tl.constexpr = K // GROUP_SIZE
    QW_STRIDE: tl.constexpr = K // CODES_PER_PACK * BITS  # int32 words per row of qweight
    i_m, i_n = tl.program_id(0), tl.program_id(1)

    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_xrow = x + o_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    p_qrow = qweight + o_n[:, None] * QW_STRIDE  # [BN, 1]

    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):  # BK divides GROUP_SIZE: one group per step
        g = k0 // GROUP_SIZE
        b_s = tl.load(scales + o_n * G + g, mask=m_n, other=0).to(tl.float32)
        b_z = tl.load(zeros + o_n * G + g, mask=m_n, other=0).to(tl.float32)
        o_k = k0 + tl.arange(0, BK)
        b_x = tl.load(p_xrow + o_k[None, :], mask=m_m[:, None], other=0)  # [BM, BK], x's dtype
        if UPCAST_DOT:  # TRITON_INTERPRET only: no bf16 tl.dot there (triton-lang/triton#11584)
            b_x = b_x.to(tl.float32)
        b_c = _load_codes(p_qrow, k0, m_n, BITS, BN, BK).to(tl.float32)
        b_w = (b_c * b_s[:, None] + b_z[:, None]).to(b_x.dtype)  # [BN, BK] dequantized weights
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        b_acc = tl.dot(b_x, tl.trans(b_w), acc=b_acc, input_precision=DOT_PRECISION)

    b_acc = _add_cherries(b_acc, p_xrow, m_m, cherry_idx, cherry_val, zeros, o_n, m_n, C, G,
                          0, K, GROUP_SIZE)
    _store_output(b_acc, y, bias, o_m, m_m, o_n, m_n, stride_ym, HAS_BIAS)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _prepare(x2d, bias, qweight, scales, cherry_idx, group_size):
    """Sizes of a call whose arguments the registry checked (pyfast/cherryq/ops.py). x2d gets unit
    stride along K (any row stride is fine) and bias unit stride (the epilogue reads bias + o_n;
    a strided or expanded bias is copied). Returns (x2d, bias, y, M, N, K, C), y [M, N] the
    output, in x's dtype, unwritten."""
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    M, N = x2d.shape[0], qweight.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    return x2d, bias, y, M, N, scales.shape[1] * group_size, cherry_idx.shape[1]


def _gemv_split_k(N: int, K: int, group_size: int, sms: int) -> int:
    """Enough (N tile, K split) programs for ~2 waves over the SMs, each split >= 1 group."""
    n_tiles = triton.cdiv(N, GEMV_BLOCK_N)
    return max(1, min(K // group_size, triton.cdiv(2 * sms, n_tiles), 32))


def plan_cherryq_gemv(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size, *,
                      target: Target, split_k: int | None = None) -> tuple[list[Launch], torch.Tensor]:
    """The launches of `cherryq_gemv_triton` on `target` and its output y (see kernels/_utils.py)."""
    x2d, bias, y, M, N, K, C = _prepare(x2d, bias, qweight, scales, cherry_idx, group_size)
    if M == 0 or N == 0:
        return [], y
    G = K // group_size
    if split_k is None:
        split_k = _gemv_split_k(N, K, group_size, target.sms)
    split_k = max(1, min(int(split_k), G))
    groups_per_split = triton.cdiv(G, split_k)
    split_k = triton.cdiv(G, groups_per_split)  # no empty split
    BN = GEMV_BLOCK_N
    launches = []
    # One program covers all rows of its chunk: at most GEMV_MAX_M rows per launch keeps the
    # [BM, BN, BK] tile small; each chunk writes its rows of y in place.
    for m0 in range(0, M, GEMV_MAX_M):
        xm, ym = x2d[m0:m0 + GEMV_MAX_M], y[m0:m0 + GEMV_MAX_M]
        Mc = xm.shape[0]
        BM = triton.next_power_of_2(Mc)
        # The [BM, BN, BK] product lives in registers: shrink BK as BM grows (BK divides group_size).
        BK = min(group_size, max(PACK, 128 // BM))
        out = ym if split_k == 1 else torch.empty((split_k, Mc, N), dtype=torch.float32, device=x2d.device)
        launches.append(Launch(_cherryq_gemv_kernel, (triton.cdiv(N, BN), split_k), (
            xm, qweight, scales, zeros, cherry_idx, cherry_val, bias, out,
            Mc, N, C, xm.stride(0), ym.stride(0) if split_k == 1 else N, groups_per_split,
        ), dict(K=K, BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
                SPLIT_K=split_k, BM=BM, BN=BN, BK=BK, num_warps=4)))
        if split_k > 1:
            launches.append(Launch(_cherryq_splitk_reduce_kernel, (triton.cdiv(N, REDUCE_BLOCK_N),), (
                out, bias, ym, Mc, N, ym.stride(0),
            ), dict(SPLIT_K=split_k, HAS_BIAS=bias is not None, BM=BM, BN=REDUCE_BLOCK_N, num_warps=4)))
    return launches, y


def cherryq_gemv_triton(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size,
                        *, split_k: int | None = None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ dequant(W).T + bias for small M (<= 8; any M works), split-K GEMV.

    x2d: float32/float16/bfloat16 [M, K], x2d.stride(1) == 1 (copied otherwise), any row stride.
    qweight int32 [N, K//32*bits], scales/zeros float16 [N, K//group_size], cherry_idx int32 [N, C],
    cherry_val float16 [N, C], bias [N] (any float dtype) or None; all contiguous.
    split_k: number of K splits (default: sized to the GPU). Returns y [M, N] in x2d's dtype.
    Deterministic: with split_k > 1 the fp32 partials go through a workspace and are summed in
    a fixed order by a second small kernel.
    """
    return run_plan(plan_cherryq_gemv, x2d.device, x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias,
                    bits, group_size, split_k=split_k)


def _gemm_config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) by M and x's dtype (BK is further capped at group_size).

    Chosen spill-free on sm_80 and sm_90 for bits 2/3/4; float32 (3xTF32, twice the operand
    bytes) needs a shorter BK beyond M = 16. Measured by bench/triton_aot.py (Triton 3.9,
    bench/results/triton_aot.md): spill-free in every tested and benchmarked configuration, at most
    190 registers with 16-bit x and 254 with float32 x (BM = 32, sm_80).
    """
    half = dtype != torch.float32
    if M <= 16:
        return 16, 64, 64, 4
    if M <= 32:
        return (32, 64, 64, 4) if half else (32, 128, 32, 4)
    return (64, 128, 64, 8) if half else (64, 128, 32, 8)


def plan_cherryq_gemm(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size, *,
                      target: Target, block_m: int | None = None) -> tuple[list[Launch], torch.Tensor]:
    """The launch of `cherryq_gemm_triton` on `target` and its output y (see kernels/_utils.py)."""
    x2d, bias, y, M, N, K, C = _prepare(x2d, bias, qweight, scales, cherry_idx, group_size)
    if M == 0 or N == 0:
        return [], y
    BM, BN, BK, num_warps = _gemm_config(M if block_m is None else block_m, x2d.dtype)
    BK = min(BK, group_size)
    return [Launch(_cherryq_gemm_kernel, (triton.cdiv(M, BM), triton.cdiv(N, BN)), (
        x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, y,
        M, N, C, x2d.stride(0), y.stride(0),
    ), dict(K=K, BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
            DOT_PRECISION="tf32x3" if x2d.dtype == torch.float32 else "tf32",
            UPCAST_DOT=target.interpreted and x2d.dtype == torch.bfloat16,
            BM=BM, BN=BN, BK=BK, num_warps=num_warps, num_stages=GEMM_NUM_STAGES))], y


def cherryq_gemm_triton(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size,
                        *, block_m: int | None = None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ dequant(W).T + bias for larger M, tensor-core GEMM (tl.dot).

    Same arguments as `cherryq_gemv_triton`. Each [BN, BK] weight tile is unpacked, dequantized
    in fp32, rounded to x's dtype and multiplied on tensor cores with fp32 accumulation (float32
    x: 3xTF32). block_m picks the tile config as if M were block_m (tests: force one M tile
    size). Returns y [M, N] in x2d's dtype.
    """
    return run_plan(plan_cherryq_gemm, x2d.device, x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias,
                    bits, group_size, block_m=block_m)


def plan_cherryq_matmul(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size, *,
                        target: Target) -> tuple[list[Launch], torch.Tensor]:
    """The plan of `cherryq_matmul_triton`: the GEMV's up to GEMV_MAX_M rows of x, the GEMM's above."""
    plan = plan_cherryq_gemv if x2d.shape[0] <= GEMV_MAX_M else plan_cherryq_gemm
    return plan(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size, target=target)


def cherryq_matmul_triton(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ dequant(W).T + bias: split-K GEMV for M <= 8, tensor-core GEMM above.

    Example:
        >>> qw = pyfast.cherryq_quantize(torch.randn(256, 512, device="cuda"), bits=4)
        >>> x = torch.randn(3, 512, device="cuda", dtype=torch.float16)
        >>> y = cherryq_matmul_triton(x, *qw.tensors(), None, qw.bits, qw.group_size)  # [3, 256] fp16
    """
    return run_plan(plan_cherryq_matmul, x2d.device, x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias,
                    bits, group_size)
