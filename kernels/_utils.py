"""Helpers shared by the Triton kernel files of every family."""

from __future__ import annotations

import functools

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
