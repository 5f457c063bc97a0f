"""CherryQ mixed-precision quantization ("Cherry on Top", NeurIPS'24): b-bit groups + fp16 cherries."""

from pyfast.cherryq.format import CherryQWeight
from pyfast.cherryq.model import estimate_impact, finish_qat, load_quantized, quantize_model, save_quantized
from pyfast.cherryq.modules import CherryQLinear
from pyfast.cherryq.ops import cherryq_matmul
from pyfast.cherryq.quantize import cherryq_dequantize, cherryq_quantize

__all__ = [
    "CherryQWeight",
    "CherryQLinear",
    "cherryq_matmul",
    "cherryq_quantize",
    "cherryq_dequantize",
    "estimate_impact",
    "quantize_model",
    "finish_qat",
    "save_quantized",
    "load_quantized",
]
