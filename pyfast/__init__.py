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
from pyfast.hedgehog import (
    HedgehogAttention,
    HedgehogFeatureMap,
    hedgehog_attention,
    hedgehog_decode,
    hedgehog_feature_map,
    linear_attention,
)
from pyfast import hedgehog
from pyfast import lnfree
from pyfast.sparse import append_kv, decode_attention, sparse_decode_attention
from pyfast import sparse
from pyfast.sparse import SparseKVCache

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
    "hedgehog_feature_map",
    "linear_attention",
    "hedgehog_attention",
    "hedgehog_decode",
    "HedgehogFeatureMap",
    "HedgehogAttention",
    "HedgehogStateCache",
    "append_kv",
    "decode_attention",
    "sparse_decode_attention",
    "SparseKVCache",
    "SparseDecodingCache",
    "enable_sparse_decoding",
    "disable_sparse_decoding",
]


def __getattr__(name):  # the transformers integration loads on first use (transformers is optional)
    if name in sparse.HF_NAMES:
        return getattr(sparse, name)
    if name == "HedgehogStateCache":
        return getattr(hedgehog, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
