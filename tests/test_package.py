"""The package itself: build info, public API names, the CLI."""

import subprocess
import sys

import torch

import pyfast


def test_build_info():
    info = pyfast.build_info()
    assert info["version"] == pyfast.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and info["cpu_isa"] in ("avx512_vnni", "avx512", "scalar")


def test_public_api():
    for name in ["cherryq_quantize", "cherryq_dequantize", "cherryq_matmul", "CherryQLinear", "CherryQWeight",
                 "estimate_impact", "quantize_model"]:
        assert hasattr(pyfast, name), name
    assert hasattr(torch.ops.pyfast, "cherryq_matmul")


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "pyfast", "info"], capture_output=True, text=True, check=True)
    assert "torch_version" in out.stdout
