"""pyfast: fused kernels for Hedgehog linear attention, Kinetics sparse decoding,
CherryQ mixed-precision matmul and LN-free inference, as torch.ops.pyfast.* ops."""

from pyfast._ops import build_info
from pyfast._version import __version__
from pyfast.cherryq import (
    CherryQLinear,
    CherryQWeight,
    cherryq_dequantize,
    cherryq_matmul,
    cherryq_quantize,
    estimate_impact,
    finish_qat,
    load_quantized,
    quantize_model,
    save_quantized,
)

__all__ = [
    "__version__",
    "build_info",
    "CherryQWeight",
    "CherryQLinear",
    "cherryq_quantize",
    "cherryq_dequantize",
    "cherryq_matmul",
    "estimate_impact",
    "quantize_model",
    "finish_qat",
    "save_quantized",
    "load_quantized",
]
