"""One helper per kind of argument check. Every message reads
`pyfast.<op>: expected <argument> <what>, got <what>`; TypeError for a wrong type or dtype,
ValueError for a wrong shape or value (docs/design.md § Rules). Checks run before any kernel."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, arg: str, expected: str, got) -> None:
    """A wrong shape or value."""
    raise ValueError(f"pyfast.{op}: expected {arg} {expected}, got {got}")


def fail_type(op: str, arg: str, expected: str, got) -> None:
    """A wrong type or dtype."""
    raise TypeError(f"pyfast.{op}: expected {arg} {expected}, got {got}")


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
    # Fast path (decode loops check every argument of every op per token): all as expected.
    if (type(t) is torch.Tensor and (dtypes is None or t.dtype in dtypes) and device is None
            and (min_ndim is None or t.dim() >= min_ndim)):
        if shape is None:
            if ndim is None or t.dim() == ndim:
                return t
        elif None not in shape:
            if t.shape == shape:
                return t
        elif t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape)):
            return t
    if not isinstance(t, torch.Tensor):
        fail_type(op, arg, "a torch.Tensor", type(t).__name__)
    if dtypes is not None and t.dtype not in dtypes:
        fail_type(op, arg, "dtype in (" + ", ".join(str(d) for d in dtypes) + ")", t.dtype)
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
    """A plain int (not a bool) >= minimum: TypeError for another type, ValueError below minimum."""
    if type(value) is int and value >= minimum:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        fail_type(op, arg, "an int", f"{type(value).__name__} {value!r}")
    if value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        fail(op, arg, what, repr(value))


def check_choice(op: str, arg: str, value, choices: Sequence) -> None:
    """value is one of choices; an int choice takes an int only (3.0 is not bits=3)."""
    if type(value) is int and value in choices:
        return
    if all(isinstance(c, int) for c in choices) and (isinstance(value, bool) or not isinstance(value, int)):
        fail_type(op, arg, f"an int, one of {tuple(choices)}", f"{type(value).__name__} {value!r}")
    if value not in choices:
        fail(op, arg, f"one of {tuple(choices)}", repr(value))
