"""cherryq_matmul microbenchmark: y = x @ W.T for M = 1, 8, 64 rows of x and W 4096x4096
(plus 8192x8192 at M=1 on GPUs), 3-bit group-128 CherryQ weights. Eight different weight
matrices are used in turn so nothing stays in cache. Compared in the same run against
F.linear in fp32 (the baseline) and fp16 and against torch's own int4 weight-only kernel.
GB/s counts each implementation's weight bytes + x + y; TFLOP/s counts 2*M*N*K for all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyfast
from pyfast._registry import REGISTRY, kernel_backends
from pyfast.bench.runner import Case

ROTATE = 8
BITS, GROUP = 3, 128


def _int4_weights(ws: list[torch.Tensor], device: str, dtype: torch.dtype):
    """torch's int4 weight-only format: packed uint4 + per-group (scale, zero) [K/G, N, 2]."""
    out = []
    for w in ws:
        n, k = w.shape
        g = w.float().reshape(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        # torch's convention: w = (q - 8) * scale + zero, zero = lo + 8 * scale
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)
        if device == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device), 8)
        out.append((packed.to(device), sz.to(device)))
    return out


def _shape_cases(device: str, m: int, n: int, k: int) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=gen) for _ in range(ROTATE)]
    qws = [pyfast.cherryq_quantize(w.to(device), bits=BITS, group_size=GROUP) for w in ws]
    x32 = torch.randn(m, k, generator=gen).to(device)
    x = x32.to(activation_dtype(device))
    shape = f"M={m} N={n} K={k}"
    io = m * k * x.element_size() + m * n * x.element_size()
    flops = 2 * m * n * k  # every implementation does the same multiply-adds
    cases = []
    if device == "cpu":
        w32 = [w.to(device) for w in ws]
        cases.append(Case("cherryq_matmul", shape, "F.linear fp32", lambda i: F.linear(x32, w32[i]), ROTATE,
                          bytes=n * k * 4 + io, flops=flops, baseline=True))
    w16 = [w.to(device, torch.float16) for w in ws]
    x16 = x32.half()
    cases.append(Case("cherryq_matmul", shape, "F.linear fp16", lambda i: F.linear(x16, w16[i]), ROTATE,
                      bytes=n * k * 2 + io, flops=flops, baseline=device != "cpu"))
    int4_dtype = torch.bfloat16
    try:
        i4 = _int4_weights(ws, device, int4_dtype)
        xb = x32.to(int4_dtype)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if device == "cpu" else torch.ops.aten._weight_int4pack_mm
        mm(xb, i4[0][0], GROUP, i4[0][1])  # probe: some builds lack the kernel
        cases.append(Case("cherryq_matmul", shape, "torch int4 (bf16 x)", lambda i: mm(xb, i4[i][0], GROUP, i4[i][1]),
                          ROTATE, bytes=n * k // 2 + n * (k // GROUP) * 4 + io, flops=flops))
    except RuntimeError:  # some torch builds lack this kernel
        pass
    qbytes = qws[0].nbytes() + io
    for b in kernel_backends(REGISTRY["cherryq_matmul"], device):
        cases.append(Case("cherryq_matmul", shape, f"pyfast {b} {BITS}b g{GROUP}",
                          lambda i, b=b: pyfast.cherryq_matmul(x, qws[i], backend=b), ROTATE,
                          bytes=qbytes, flops=flops))
    return cases


def activation_dtype(device: str) -> torch.dtype:
    """x's dtype for the pyfast kernels: fp32 on the CPU, fp16 activations everywhere on GPUs."""
    return torch.float32 if device == "cpu" else torch.float16


def shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """The (M, N, K) shapes timed (bench/triton_aot.py compiles the Triton kernels for the GPU ones)."""
    if quick:
        return [(1, 1024, 1024), (16, 1024, 1024)]
    return [(1, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096)] + ([(1, 8192, 8192)] if device == "cuda" else [])


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for m, n, k in shapes(device, quick):
        out += _shape_cases(device, m, n, k)
    return out
