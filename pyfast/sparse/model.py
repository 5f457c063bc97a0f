"""Kinetics sparse decoding inside transformers models (Llama, Qwen2, GPT-2 and look-alikes).

Two pieces, no model code patched:
  * `SparseDecodingCache`, a transformers `Cache` over a pyfast `SparseKVCache`. Its `update()`
    appends the step's keys/values (pyfast.append_kv) and returns the cache's valid prefix, tagged
    with the (cache, layer) it belongs to.
  * the attention function "pyfast_sparse", registered in transformers' AttentionInterface (and
    its mask builder in AttentionMaskInterface, the SDPA one). Given keys tagged by a
    SparseDecodingCache it attends through the pyfast cache: one new token -> block top-k sparse
    decode; several (prefill) -> exact causal attention. Given anything else (no cache, a
    DynamicCache) it is transformers' SDPA attention, so the switched model stays exact elsewhere.

Example:
    >>> cache = pyfast.enable_sparse_decoding(model, max_length=4096, topk=16)   # block_size 16
    >>> out = model.generate(ids, max_new_tokens=128, cache=cache, do_sample=False)
    >>> # transformers < 5.24 names the argument past_key_values: generate(..., past_key_values=cache)
    >>> cache.stats()["kv_read_fraction"]
    >>> cache.reset()                                   # before the next prompt (or make a new one)

Supported: batch 1; batch > 1 with left padding (the padding is dropped from the cache at
prefill, so each row holds only its own tokens: the pads are never attended, as in HF); beam
search (`generate(num_beams=n)` expands the inputs before the prefill, so build the cache with
batch_size = batch * n; beams are reordered in place); batch_repeat_interleave and
batch_select_indices (they reallocate the cache for the new batch size). Not supported:
sliding-window layers, torch.compile of the decode step (the tag lives on a Python tensor
attribute).
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pyfast._validate import check_int
from pyfast.sparse.modules import SparseKVCache
from pyfast.sparse.ops import check_budget

ATTN_IMPLEMENTATION = "pyfast_sparse"
# The keyword a cache is passed under to model(...) and model.generate(...): transformers 5.24
# renamed `past_key_values` to `cache` (the old name still works there, with a FutureWarning).
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
_TAG = "_pyfast_sparse"  # attribute on the key tensor returned by update(): (SparseKVCache, layer)


class _SparseLayer(CacheLayerMixin):
    """One layer's view of the shared SparseKVCache. `seen` counts the positions fed so far,
    padding included: that is the length transformers builds masks and positions from."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, kv: SparseKVCache, layer_idx: int):
        super().__init__()
        self.kv, self.layer_idx, self.seen = kv, layer_idx, 0
        self.bind()
        self.is_initialized = True

    def bind(self) -> None:
        """(Re)point at this layer's slices of the SparseKVCache (after a batch-size change)."""
        self.keys, self.values = self.kv.k_cache[self.layer_idx], self.kv.v_cache[self.layer_idx]
        self.dtype, self.device, self.batch_size = self.kv.dtype, self.kv.device, self.kv.batch_size

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated in __init__
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.kv.append(self.layer_idx, key_states, value_states)
        self.seen += key_states.shape[2]
        n = min(self.seen, self.kv.max_length)
        keys, values = self.keys[:, :, :n], self.values[:, :, :n]
        setattr(keys, _TAG, (self.kv, self.layer_idx))
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.kv.max_length

    def reset(self) -> None:
        self.seen = 0


def _decoder_geometry(config) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, n_kv_heads, head_dim) of a decoder config (Llama, Qwen2, GPT-2 names)."""
    config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"pyfast.SparseDecodingCache: expected only full-attention layers, got {layer_types}")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, n_heads, n_kv, head_dim


class SparseDecodingCache(Cache):
    """A transformers Cache for block top-k sparse decoding, preallocated for `max_length` tokens.

    Pass it as `cache=` (transformers >= 5.24; `past_key_values=` before) to `model(...)` or
    `model.generate(...)` of a model switched to attn_implementation "pyfast_sparse"
    (pyfast.enable_sparse_decoding does both). topk=None
    decodes densely (pyfast.decode_attention). Options as pyfast.SparseKVCache; dtype and device
    default to the model's. `self.kv` is the underlying SparseKVCache; `stats()` its counters;
    the selection options can be changed between steps (`cache.kv.topk = 8`).
    """

    def __init__(
        self,
        model,
        *,
        max_length: int,
        batch_size: int = 1,
        block_size: int = 16,
        topk: int | None = 64,
        sink_blocks: int = 1,
        local_blocks: int = 4,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ):
        n_layers, _, n_kv, head_dim = _decoder_geometry(model.config)
        if topk is not None:  # checked again by every decode step (they can be changed); fail early here
            check_budget("SparseDecodingCache", topk, sink_blocks, local_blocks)
        self.kv = SparseKVCache(
            n_layers, batch_size, n_kv, head_dim, max_length,
            block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
            dtype=dtype or model.dtype, device=device or model.device, backend=backend,
        )
        super().__init__(layers=[_SparseLayer(self.kv, i) for i in range(n_layers)])

    def stats(self) -> dict:
        """The SparseKVCache's counters: 'decode_steps' (single-token decode steps, i.e. tokens
        decoded; `generate(max_new_tokens=n)` makes n - 1, its first token comes from the prefill),
        'layer_steps' (the same summed over layers), 'kv_read_fraction', 'kept_token_fraction'."""
        return self.kv.stats()

    def reset(self) -> None:
        self.kv.reset()
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last |tokens_to_remove| tokens (transformers passes a negative count)."""
        n = abs(tokens_to_remove)
        self.kv.crop(n)
        for layer in self.layers:
            layer.seen = max(layer.seen - n, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence `repeats` times in place (beam expansion); reallocates the cache."""
        check_int("SparseDecodingCache.batch_repeat_interleave", "repeats", repeats, minimum=1)
        self._select(torch.arange(self.kv.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (in that order); reallocates if the batch size changes."""
        self._select(indices)

    def _select(self, index: torch.Tensor) -> None:
        self.kv.select_batch(index)
        for layer in self.layers:
            layer.bind()


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Tq, D]; returns ([B, Tq, Hq, D], None)."""
    tag = getattr(key, _TAG, None)
    if tag is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("pyfast sparse decoding: sliding-window attention layers are not supported")
    kv, layer = tag
    keep = None
    tq = query.shape[2]
    if tq > 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        # the SDPA mask [B, 1, Tq, kv_len]: a new token is real iff it may attend to itself
        # (padding never does); the new tokens are the last Tq of the kv positions
        keep = attention_mask[:, 0].diagonal(offset=attention_mask.shape[-1] - tq, dim1=-2, dim2=-1)
        if bool(keep.all()):
            keep = None
        else:
            kv.unpad_last(layer, keep)
    out = kv.attend(layer, query, scale=scaling, keep=keep)
    return out.transpose(1, 2), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable_sparse_decoding(model, *, max_length: int, **options) -> SparseDecodingCache:
    """Switch `model` to attn_implementation "pyfast_sparse" and return a SparseDecodingCache for it.

    options: batch_size=1, block_size=16, topk=64 (None: dense), sink_blocks=1, local_blocks=4,
    dtype, device, backend. The model stays exact without the cache (SDPA); undo with
    disable_sparse_decoding(model). On an error (bad option) the model is left unchanged.
    Pass the cache to `model.generate` / `model(...)` as `cache=cache` (transformers >= 5.24; older
    versions name it `past_key_values=cache`, which 5.24 still accepts with a FutureWarning).

    Example (a tiny random Llama; any transformers decoder with SDPA attention works the same):
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                                num_key_value_heads=2, intermediate_size=128)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> ids = torch.randint(0, 97, (1, 40))
        >>> cache = pyfast.enable_sparse_decoding(model, max_length=64, topk=2)
        >>> out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
        >>> out.shape
        torch.Size([1, 48])
        >>> cache.stats()["decode_steps"], cache.stats()["layer_steps"]   # 7 tokens decoded (1 from the prefill), 2 layers
        (7, 14)
        >>> pyfast.disable_sparse_decoding(model)
    """
    cache = SparseDecodingCache(model, max_length=max_length, **options)  # checks everything first
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        model._pyfast_previous_attn = previous
    return cache


def disable_sparse_decoding(model) -> None:
    """Give `model` back the attention implementation it had before enable_sparse_decoding.

    Example: see `enable_sparse_decoding`.
        >>> pyfast.disable_sparse_decoding(torch.nn.Linear(2, 2))   # never enabled: nothing to undo
    """
    previous = getattr(model, "_pyfast_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        del model._pyfast_previous_attn
