"""Per-call overhead of the checked entry points on tiny inputs, where decoding spends its time on
many small ops: the unchecked C++ kernel (pyfast._C.<op>_cpu, the baseline here), the op through
the dispatcher (torch.ops.pyfast.<op>) and the public function (pyfast.<op>), both of which run
every rule of the op. The "speed-up" column is then below 1: the ratio of the bare kernel's time
to the checked call's; `overhead_us` in the JSON is the difference of the medians. CPU only, one
thread (on CUDA every call is launch-bound)."""

from __future__ import annotations

import torch

import pyfast
from pyfast import _C
from pyfast.bench.runner import Case

ROTATE = 4
REPEATS = 3000  # single calls of a few microseconds: many samples for a stable median


def _cherryq() -> list[Case]:
    qws = [pyfast.cherryq_quantize(torch.randn(64, 128), bits=3, group_size=128) for _ in range(ROTATE)]
    xs = [torch.randn(1, 128) for _ in range(ROTATE)]
    raw = [(x, *qw.tensors(), None, qw.bits, qw.group_size) for x, qw in zip(xs, qws)]
    shape = "M=1 N=64 K=128"
    return [
        Case("overhead", f"cherryq_matmul {shape}", "C++ kernel, unchecked", lambda i: _C.cherryq_matmul_cpu(*raw[i]),
             ROTATE, baseline=True, min_repeats=REPEATS, threads=1),
        Case("overhead", f"cherryq_matmul {shape}", "torch.ops.pyfast",
             lambda i: torch.ops.pyfast.cherryq_matmul.default(*raw[i]), ROTATE, min_repeats=REPEATS, threads=1),
        Case("overhead", f"cherryq_matmul {shape}", "pyfast.cherryq_matmul",
             lambda i: pyfast.cherryq_matmul(xs[i], qws[i]), ROTATE, min_repeats=REPEATS, threads=1),
    ]


def _sparse() -> list[Case]:
    caches = []
    for _ in range(ROTATE):
        k, v = torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16)
        bk, n = torch.zeros(1, 2, 4, 16), torch.zeros(1, dtype=torch.int32)
        pyfast.append_kv(k, v, bk, n, torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
        caches.append((torch.randn(1, 4, 16), k, v, n, bk))
    opts = (16, 64, 1, 4, None)
    shape = "sparse_decode B=1 Hq=4 L=40 D=16"
    return [
        Case("overhead", shape, "C++ kernel, unchecked", lambda i: _C.sparse_decode_attention_cpu(*caches[i], *opts),
             ROTATE, baseline=True, min_repeats=REPEATS, threads=1),
        Case("overhead", shape, "torch.ops.pyfast",
             lambda i: torch.ops.pyfast.sparse_decode_attention.default(*caches[i], *opts), ROTATE, min_repeats=REPEATS, threads=1),
        Case("overhead", shape, "pyfast.sparse_decode", lambda i: pyfast.sparse_decode_attention(*caches[i]),
             ROTATE, min_repeats=REPEATS, threads=1),
    ]


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []
    return _cherryq() + _sparse()
