"""Kinetics block top-k sparse decoding: KV cache with block mean keys, dense and sparse decode."""

from pyfast.sparse.cache import SparseKVCache
from pyfast.sparse.ops import append_kv, decode_attention, sparse_decode_attention

# transformers integration (pyfast/sparse/hf.py), imported on first use: transformers is optional
HF_NAMES = ("SparseDecodingCache", "enable_sparse_decoding", "disable_sparse_decoding")

__all__ = ["append_kv", "decode_attention", "sparse_decode_attention", "SparseKVCache", *HF_NAMES]


def __getattr__(name):
    if name in HF_NAMES:
        from pyfast.sparse import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
