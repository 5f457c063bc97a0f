"""Kinetics block top-k sparse decoding: KV cache with block mean keys, dense and sparse decode."""

from pyfast.sparse.modules import SparseKVCache
from pyfast.sparse.ops import append_kv, decode_attention, sparse_decode_attention

# The transformers integration (model conversion, pyfast/sparse/model.py) is imported on first use:
# transformers is optional.
HF_NAMES = ("SparseDecodingCache", "enable_sparse_decoding", "disable_sparse_decoding")

__all__ = ["append_kv", "decode_attention", "sparse_decode_attention", "SparseKVCache", *HF_NAMES]


def __getattr__(name):
    if name in HF_NAMES:
        from pyfast.sparse import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
