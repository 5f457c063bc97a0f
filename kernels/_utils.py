"""Helpers shared by the Triton kernel files of every family.

Every launcher is split in two: a plan `plan_<launcher>(..., target=...)` that allocates the
outputs and returns the kernel launches (kernel, grid, arguments, constexprs and launch options)
as a pure function of the tensors' metadata (shapes, strides, dtypes, never their data) and of the
`Target`, and the launcher itself, which runs the plan for its tensors' device (`run_plan`).
bench/triton_aot.py calls the same plans on meta tensors with a GPU target to compile every
configuration ahead of time for sm_80 and sm_90 (docs/design.md § Kernels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _probe(x):
    tl.store(x, 0)


# True when kernels are built for TRITON_INTERPRET=1 (numpy on the host): the decorator then
# returns an InterpretedFunction instead of a JITFunction at import time.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (1 in the interpreter, where the fewest programs run fastest)."""
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan's choice of tiles, splits and launch options depends on besides shapes and
    dtypes: whether the kernels run in the Triton interpreter, and the SM count of the GPU."""

    interpreted: bool
    sms: int

    @staticmethod
    def of(device: torch.device) -> "Target":
        return Target(INTERPRETED, num_sms(device))


@dataclasses.dataclass
class Launch:
    """One kernel launch: kernel[grid](*args, **kwargs); kwargs holds the constexprs and the launch
    options (num_warps, num_stages)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


# Called as RECORD(plan, args, kwargs) before each launcher runs its plan, when set (bench/triton_aot.py
# records the launcher calls of a test run this way, to plan them again for a GPU target).
RECORD: Callable | None = None


def run_plan(plan: Callable, device: torch.device, *args, **kwargs):
    """Launch what plan(*args, target=Target.of(device), **kwargs) returns ((launches, result)) and
    return the result."""
    if RECORD is not None:
        RECORD(plan, args, kwargs)
    launches, result = plan(*args, target=Target.of(device), **kwargs)
    for launch in launches:
        launch()
    return result
