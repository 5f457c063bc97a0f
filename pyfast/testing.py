"""Test helpers shared by every family: one assert_close, the tolerances of docs/design.md § Testing, NaN poisoning."""

from __future__ import annotations

import contextlib

import torch

# Relative error ||out - ref|| / ||ref|| allowed per output dtype (docs/design.md § Testing).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
REL_TOL_TF32 = 3e-4  # fp32 on GPUs (TF32 tensor cores)


def rel_tol(dtype: torch.dtype, device: torch.device | str = "cpu", *, backend: str | None = None) -> float:
    """Tolerance for `dtype` results: fp32 gets 3e-4 on GPUs and in Triton kernels (tf32 dots)."""
    if dtype == torch.float32 and (torch.device(device).type == "cuda" or backend == "triton"):
        return REL_TOL_TF32
    return REL_TOL[dtype]


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Fail with max abs diff, relative RMS error and NaN counts unless ||out-ref||/||ref|| <= tol
    and NaNs sit exactly where the reference has them."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    finite = ~(nan_o | nan_r)
    diff = (o - r)[finite]
    # Relative to the reference's norm however small (float64 holds 1e-300); an all-zero
    # reference must be matched exactly.
    ref_norm, diff_norm = r[finite].norm().item(), diff.norm().item() if diff.numel() else 0.0
    rel = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else float("inf"))
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    ok = rel <= tol and torch.equal(nan_o, nan_r)
    assert ok, (
        f"{name}: relative error {rel:.3e} (tol {tol:.1e}), max abs diff {max_abs:.3e}, "
        f"NaN in output {int(nan_o.sum())} vs reference {int(nan_r.sum())} of {o.numel()}"
    )


@contextlib.contextmanager
def cpu_isa(isa: str):
    """While active, the C++ CPU kernels run capped at `isa` ("scalar", "avx512", "avx512_vnni");
    the automatic choice comes back afterwards."""
    from pyfast import _C

    _C.set_cpu_isa(isa)
    try:
        yield
    finally:
        _C.set_cpu_isa("auto")


@contextlib.contextmanager
def poisoned_outputs():
    """While active, new tensors from torch.empty/empty_like/new_empty and every pyfast C++ op
    output start as NaN, so an unwritten element cannot pass a test."""
    from pyfast import _C

    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: nan_fill(originals[0](*a, **k))
    torch.empty_like = lambda *a, **k: nan_fill(originals[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: nan_fill(originals[2](self, *a, **k))
    _C.set_poison_outputs(True)
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
        _C.set_poison_outputs(False)
