"""Loads the compiled extension (the kernel entry points the op registry calls) and reports build info."""

from __future__ import annotations

import importlib.util

import torch

try:
    from pyfast import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pyfast: the compiled extension pyfast._C is missing or does not match the installed torch "
        f"({torch.__version__}); rebuild with `pip install --no-build-isolation -e .` ({e})"
    ) from e


_HAS_TRITON = importlib.util.find_spec("triton") is not None

# Tests only (tests/cuda_emu.py): a module with the *_cuda entry points compiled for the CPU
# emulation of the CUDA kernels, which the registry then runs for backend="cuda" on CPU tensors.
_emulated_cuda = None


def emulate_cuda(module):
    """Route the *_cuda entry points to `module` (None: back to pyfast._C); returns the previous one."""
    global _emulated_cuda
    previous, _emulated_cuda = _emulated_cuda, module
    return previous


def cuda_emulated() -> bool:
    return _emulated_cuda is not None


def has_triton() -> bool:
    return _HAS_TRITON


def has_cuda_kernels() -> bool:
    """True when pyfast._C was built with its CUDA kernels (a CUDA torch and nvcc at build time),
    or while the tests emulate them."""
    return _emulated_cuda is not None or bool(_C.build_info()["cuda"])


def build_info() -> dict:
    """How pyfast was built and what this process can run: version, torch version, CUDA, arch list, CPU ISA.

    Example:
        >>> info = pyfast.build_info()
        >>> sorted(info)
        ['cpu_isa', 'cuda', 'cuda_arch_list', 'cuda_available', 'torch_version', 'triton', 'version']
    """
    info = dict(_C.build_info())
    info["triton"] = has_triton()
    info["cuda_available"] = torch.cuda.is_available()
    return info


def kernel(name: str):
    """The compiled entry point `name` (csrc/kernels.h), e.g. "cherryq_matmul_cpu", as a function
    that looks it up on first call (a CPU-only build has no *_cuda entry points)."""
    if name.endswith("_cuda"):
        return lambda *args: getattr(_emulated_cuda or _C, name)(*args)
    fn = None

    def call(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(_C, name)
        return fn(*args)

    return call
