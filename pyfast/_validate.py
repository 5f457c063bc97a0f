"""One place for argument checks. Every message reads
`pyfast.<op>: expected <what> for <argument>, got <what>` and is raised before any kernel runs."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, arg: str, expected: str, got, *, error: type[Exception] = ValueError) -> None:
    """Raise `error` (ValueError for shapes/values, TypeError for types/dtypes) with the common message."""
    raise error(f"pyfast.{op}: expected {arg} {expected}, got {got}")


def _shape_str(shape: Sequence) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    op: str,
    arg: str,
    t,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check one tensor argument. `shape` entries may be None (any size)."""
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "to be a torch.Tensor", type(t).__name__)
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            fail(op, arg, "dtype in (" + ", ".join(str(d) for d in dtypes) + ")", t.dtype)
    if ndim is not None and t.dim() != ndim:
        fail(op, arg, f"a {ndim}-D tensor", f"shape {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, arg, f"at least {min_ndim} dims", f"shape {list(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            fail(op, arg, f"shape {_shape_str(shape)}", f"shape {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        fail(op, arg, f"on device {device}", t.device)
    return t


def check_int(op: str, arg: str, value, *, minimum: int) -> None:
    """A plain int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        fail(op, arg, what, repr(value))


def check_choice(op: str, arg: str, value, choices: Sequence) -> None:
    if value not in choices:
        fail(op, arg, f"one of {tuple(choices)}", value)


def check_backend(op: str, backend: str | None, device: torch.device) -> str:
    """Resolve `backend=None` to the device's default and check an explicit choice fits the device."""
    check_choice(op, "backend", backend, (None, "cpu", "cuda", "triton", "reference"))
    if backend is None:
        return "cpu" if device.type == "cpu" else "cuda"
    if backend == "cpu" and device.type != "cpu":
        fail(op, "tensors", "on the CPU for backend='cpu'", device)
    if backend == "cuda" and device.type != "cuda":
        fail(op, "tensors", "on a CUDA device for backend='cuda'", device)
    return backend
