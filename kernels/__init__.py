"""Triton kernels of pyfast, one module per family (installed as pyfast.kernels)."""
