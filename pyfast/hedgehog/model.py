"""Hedgehog linear attention inside transformers models (Llama family: Llama, Qwen2, SmolLM2;
BERT: BertModel, BertForMaskedLM, non-causal), no model code patched.

Pieces:
  * `convert(model)` attaches a `HedgehogAttention` to every self-attention module (as the
    submodule `hedgehog`), switches the model to the attention function "pyfast_hedgehog"
    (registered in transformers' AttentionInterface, with the SDPA mask builder in
    AttentionMaskInterface) and, by default, freezes everything but the feature maps (and the
    hybrid's mixing factors). The function runs Hedgehog attention on the post-RoPE q, k, v the
    model hands it (GQA: k, v with num_key_value_heads heads). feature_map="elu" / "t2r" gives
    the paper's fixed-nonlinearity baselines instead (same conversion, distillation and cache).
  * `softmax_attention(model)` (a context manager) / `unconvert(model)`: the original softmax
    attention, temporarily (the teacher of distillation) or for good.
  * `distill(model, batches, steps=...)`: the paper's stage 1, attention distillation: the
    softmax model runs once per batch, its q, k are captured per layer, and the feature maps are
    trained on the sum over layers of HedgehogAttention.distillation_loss.
  * `HedgehogStateCache`: a transformers Cache holding per layer the recurrent state
    (S [B, Hkv, 2F, Dv], z [B, Hkv, 2F]) float32 instead of keys and values: the prefill runs
    hedgehog_attention(return_state=True), every one-token step hedgehog_decode (state updated in
    place), so `model.generate(ids, cache=HedgehogStateCache(model))` decodes in constant memory.

Masks: the function accepts the causal (or, for BERT, bidirectional) mask with padding that
transformers builds, and nothing else (sliding-window layers and custom masks raise a ValueError).
Padding tokens are dropped: the real tokens of every row are packed into one sequence with
`cu_seqlens` (each row its own segment), so pads are never attended and take no part in the
states, as in softmax attention with the padding mask; pad queries get zero outputs.
Without a HedgehogStateCache (no cache, or the DynamicCache that transformers makes by default)
the function recomputes Hedgehog attention over all the keys it is given, which is exact but
not constant-memory. Attention dropout is not applied (Hedgehog has no attention matrix to drop
from); cross-attention modules are not converted and keep SDPA.

Example (a tiny random Llama; backend="reference" runs the float64 spec anywhere):
    >>> model = pyfast.hedgehog.convert(model, feature_dim=16, backend="reference")
    >>> losses = pyfast.hedgehog.distill(model, [ids], steps=20)          # stage 1
    >>> cache = pyfast.HedgehogStateCache(model)
    >>> out = model.generate(ids, max_new_tokens=32, do_sample=False, cache=cache)
    >>> with pyfast.hedgehog.softmax_attention(model):                   # the original model
    ...     teacher_logits = model(ids).logits
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pyfast._validate import check_choice, check_int
from pyfast.hedgehog.modules import FEATURE_MAPS, HedgehogAttention

ATTN_IMPLEMENTATION = "pyfast_hedgehog"
TEACHER_IMPLEMENTATION = "pyfast_hedgehog_teacher"  # SDPA that also records q, k for distill()
# The keyword a cache is passed under to model(...) and model.generate(...) (transformers 5.24
# renamed `past_key_values` to `cache`), as in pyfast.sparse.model.
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
_TAG = "_pyfast_hedgehog"  # attribute on the key tensor returned by a HedgehogStateCache layer
_STATE = "_pyfast_hedgehog_state"  # model attribute: what convert() changed, for unconvert()


# ---------------------------------------------------------------------------------------------
# Finding the attention modules
# ---------------------------------------------------------------------------------------------
def _geometry(module) -> tuple[int, int, int, torch.Tensor] | None:
    """(Hq, Hkv, D, a projection weight) of a self-attention module transformers calls the
    attention function from, or None. Llama-family modules have q_proj/k_proj/v_proj and
    head_dim; BERT's have query/key/value and attention_head_size."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(module, "is_causal") or "Cross" in type(module).__name__:
        return None
    if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        return hq, hkv, module.head_dim, module.q_proj.weight
    if all(hasattr(module, n) for n in ("query", "key", "value", "attention_head_size", "num_attention_heads")):
        h = module.num_attention_heads
        return h, h, module.attention_head_size, module.query.weight
    return None


def attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every self-attention module convert() handles, in model order."""
    return [(name, m) for name, m in model.named_modules() if _geometry(m) is not None]


def hedgehog_modules(model) -> list[HedgehogAttention]:
    """The HedgehogAttention of every converted attention module, in model order."""
    mods = (getattr(m, "hedgehog", None) for _, m in attention_modules(model))
    return [hh for hh in mods if isinstance(hh, HedgehogAttention)]


def _converted(model, op: str) -> dict:
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"pyfast.hedgehog.{op}: the model is not converted "
                         "(call pyfast.hedgehog.convert(model) first)")
    return state


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def _keep(attention_mask, b: int, tq: int, width: int, causal: bool) -> torch.Tensor | None:
    """The real (non-padding) key positions, bool [B, width], from the 4-D mask transformers hands
    the attention function (None: no mask, every position real). The mask must be the causal (or
    bidirectional) mask restricted to those keys for every real query (query i is position
    width - Tq + i); anything else (sliding windows, custom masks) raises a ValueError."""
    if attention_mask is None:
        return None
    m = attention_mask
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != (tq, width):
        raise ValueError(f"pyfast hedgehog attention: expected a [B, 1, {tq}, {width}] attention mask, got "
                         f"{getattr(m, 'shape', type(m).__name__)}")
    if m.dtype != torch.bool:  # additive float mask: 0 where attended, very negative elsewhere
        m = m > torch.finfo(m.dtype).min / 2
    m = m[:, 0].expand(b, tq, width)
    keep = m.any(dim=1)  # a real key is attended by some query (the last real one, at least)
    expected = keep[:, None, :].expand(b, tq, width)
    if causal:
        pos = torch.arange(width, device=m.device)
        expected = expected & (pos[None, :] <= pos[width - tq :, None])[None]
    real_rows = keep[:, width - tq :]
    if not bool(((m == expected) | ~real_rows[:, :, None]).all()):
        kind = "causal" if causal else "bidirectional"
        raise ValueError(f"pyfast hedgehog attention: only the {kind} attention mask with padding is supported "
                         "(no sliding-window layers, no custom masks)")
    return None if bool(keep.all()) else keep


def _run(hh: HedgehogAttention, q, k, v, keep, causal: bool, scale, *, initial_state=None, return_state=False):
    """Hedgehog attention of q [B, Hq, Tq, D] over k, v [B, Hkv, Tk, *] (Tk >= Tq: the queries are
    the last Tq positions; earlier ones are zero-padded and their rows dropped). keep (bool [B, Tk]
    or None): the real positions; each row's real tokens are packed as one segment (cu_seqlens),
    pad rows of the output are zero. Returns out [B, Hq, Tq, Dv] (and the state per row)."""
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    offset = tk - tq
    if offset:
        if not causal:
            raise ValueError("pyfast hedgehog attention: a non-causal layer needs as many queries as keys")
        q = F.pad(q, (0, 0, offset, 0))
    kw = dict(causal=causal, scale=scale, initial_state=initial_state, return_state=return_state)
    if keep is None:
        res = hh(q, k, v, **kw)
        out, state = res if return_state else (res, None)
    else:
        keep = keep.to(q.device)
        idx = [torch.nonzero(keep[i]).flatten() for i in range(b)]
        lengths = [int(i.numel()) for i in idx]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=q.device)
        pack = lambda x: torch.cat([x[i, :, idx[i]] for i in range(b)], dim=1)[None]  # noqa: E731
        res = hh(pack(q), pack(k), pack(v), cu_seqlens=cu, **kw)
        packed, state = res if return_state else (res, None)
        out = packed.new_zeros(b, q.shape[1], tk, packed.shape[-1])
        for i in range(b):
            out[i, :, idx[i]] = packed[0, :, int(cu[i]) : int(cu[i + 1])]
    out = out[:, :, offset:]
    return (out, state) if return_state else out


# ---------------------------------------------------------------------------------------------
# The attention functions
# ---------------------------------------------------------------------------------------------
def _causal(module, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def hedgehog_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "pyfast_hedgehog": query [B, Hq, Tq, D], key/value
    [B, Hkv, Tk, *] -> ([B, Tq, Hq, Dv], None). Modules without a `hedgehog` submodule (not
    converted: cross-attention) run SDPA."""
    hh = getattr(module, "hedgehog", None)
    if not isinstance(hh, HedgehogAttention):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("pyfast hedgehog attention: sliding-window attention layers are not supported")
    causal = _causal(module, kwargs)
    b, _, tq, _ = query.shape
    layer = getattr(key, _TAG, None)
    if layer is None:
        keep = _keep(attention_mask, b, tq, key.shape[2], causal)
        out = _run(hh, query, key, value, keep, causal, scaling)
    else:
        out = layer.attend(hh, query, key, value, attention_mask, causal, scaling)
    return out.transpose(1, 2), None


_CAPTURE: list = []  # stack of lists distill() records (module, q, k, causal, scale, keep) into


def _teacher_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, recording the converted layers' q, k (and key padding) while distill() captures."""
    if _CAPTURE and isinstance(getattr(module, "hedgehog", None), HedgehogAttention):
        causal = _causal(module, kwargs)
        if query.shape[2] != key.shape[2]:
            raise ValueError("pyfast.hedgehog.distill: run the teacher without a cache (as many queries as keys)")
        keep = _keep(attention_mask, query.shape[0], query.shape[2], key.shape[2], causal)
        _CAPTURE[-1].append((module, query.detach(), key.detach(), causal, scaling, keep))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, hedgehog_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
ALL_ATTENTION_FUNCTIONS.register(TEACHER_IMPLEMENTATION, _teacher_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(TEACHER_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def convert(model, *, feature_dim: int | None = None, window: int = 0, feature_map: str = "hedgehog",
            backend: str | None = None, train_only_feature_maps: bool = True, eps: float = 1e-6, bias: bool = True):
    """Give every self-attention module of `model` a HedgehogAttention (`module.hedgehog`) and switch
    the model to Hedgehog attention (attn_implementation "pyfast_hedgehog"). Returns the model.

    model: a transformers Llama-family causal LM (Llama, Qwen2, SmolLM2, ...; GQA) or BERT
    (BertModel, BertForMaskedLM: non-causal). feature_dim: F of the feature maps (default the head
    dim: identity init); window > 0: the LoLCATs sliding-window hybrid (causal models only; see
    HedgehogAttention); feature_map: "hedgehog" (default), or the fixed-nonlinearity baselines
    "elu" / "t2r" (HedgehogAttention; run through pyfast.linear_attention, window 0 only);
    backend: of the pyfast ops (None: the device's default kernels). The
    feature maps take the attention projections' dtype and device. With train_only_feature_maps
    every other parameter is frozen (requires_grad False; unconvert() restores the flags).
    Undo with unconvert(model); softmax_attention(model) switches back temporarily.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                num_key_value_heads=2, intermediate_size=64)
        >>> model = pyfast.hedgehog.convert(transformers.LlamaForCausalLM(cfg), feature_dim=8)
        >>> model.config._attn_implementation, sum(p.numel() for p in model.parameters() if p.requires_grad)
        ('pyfast_hedgehog', 864)
        >>> pyfast.hedgehog.unconvert(model).config._attn_implementation
        'sdpa'
    """
    check_int("pyfast.hedgehog.convert", "window", window, minimum=0)
    check_choice("pyfast.hedgehog.convert", "feature_map", feature_map, FEATURE_MAPS)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("pyfast.hedgehog.convert: the model is already converted (unconvert it first)")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"pyfast.hedgehog.convert: found no supported self-attention module in {type(model).__name__} "
                         "(Llama-family or BERT attention expected)")
    if window and not all(m.is_causal for _, m in modules):
        raise ValueError(f"pyfast.hedgehog.convert: window={window} needs causal attention layers (the sliding window "
                         "is causal); use window=0 for a bidirectional model")
    made = []
    for _, m in modules:
        hq, hkv, d, proj = _geometry(m)
        made.append((m, HedgehogAttention(hq, hkv, d, feature_dim, window=window, feature_map=feature_map, eps=eps,
                                          bias=bias, backend=backend, dtype=proj.dtype, device=proj.device)))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    previous = model.config._attn_implementation
    for m, hh in made:
        m.hedgehog = hh
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, _STATE, {"previous": previous, "requires_grad": requires_grad})
    if train_only_feature_maps:
        model.requires_grad_(False)
        for _, hh in made:
            hh.requires_grad_(True)
    return model


def unconvert(model):
    """Undo convert(): drop the `hedgehog` submodules, restore the attention implementation and
    the parameters' requires_grad flags. Returns the model (its softmax logits are exactly the
    original's: no weight was changed). Example: see convert."""
    state = _converted(model, "unconvert")
    for _, m in attention_modules(model):
        if hasattr(m, "hedgehog"):
            del m.hedgehog
    model.set_attn_implementation(state["previous"])
    for name, p in model.named_parameters():
        if name in state["requires_grad"]:
            p.requires_grad_(state["requires_grad"][name])
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    current = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


def softmax_attention(model):
    """Context manager: run a converted model with its original softmax attention (the
    implementation it had before convert(), e.g. "sdpa"), the distillation teacher.

    Example:
        >>> with pyfast.hedgehog.softmax_attention(model):   # doctest: +SKIP
        ...     teacher_logits = model(ids).logits
    """
    return _attention_implementation(model, _converted(model, "softmax_attention")["previous"])


# ---------------------------------------------------------------------------------------------
# Distillation (the paper's stage 1)
# ---------------------------------------------------------------------------------------------
def _cycle(batches):
    seen = []
    for batch in batches:
        seen.append(batch)
        yield batch
    if not seen:
        raise ValueError("pyfast.hedgehog.distill: got no batches")
    while True:
        yield from seen


def _forward_kwargs(model, batch) -> dict:
    kw = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kw.setdefault("use_cache", False)
    return kw


def _record_teacher(model, batch) -> list:
    """Run the softmax teacher on one batch; (module, q, k, causal, scale, keep) per converted layer."""
    _CAPTURE.append([])
    try:
        with torch.no_grad():
            model(**_forward_kwargs(model, batch))
    finally:
        captured = _CAPTURE.pop()
    return captured


def distill(model, batches, *, steps: int, lr: float = 1e-2, optimizer: torch.optim.Optimizer | None = None,
            callback=None, reuse_teacher: bool = False) -> list[float]:
    """Attention distillation (the paper's stage 1) of a converted model; returns the loss history.

    Per step: one batch (batches: an iterable of input_ids tensors [B, T] or of dicts of model
    keyword arguments, e.g. with an attention_mask; cycled when shorter than `steps`) runs through
    the model with softmax attention (SDPA, eval mode, no grad) while every converted layer's
    post-RoPE q, k (and padding) are recorded; then one optimizer step (AdamW(lr), or `optimizer`)
    on the sum over layers of HedgehogAttention.distillation_loss (teacher: those softmax weights).
    Only the HedgehogAttention parameters are trained (the model's weights are untouched).
    callback(step, loss) is called after every step. reuse_teacher: record each batch's q, k once
    and reuse them when the batches cycle (several epochs over a few batches: the teacher forward
    is most of a step's time), at the cost of keeping them, per batch, layers x (Hq + Hkv) x T x D
    floats per sequence.

    Example:
        >>> losses = pyfast.hedgehog.distill(model, [ids], steps=10)   # doctest: +SKIP
    """
    _converted(model, "distill")
    check_int("pyfast.hedgehog.distill", "steps", steps, minimum=0)
    params = [p for hh in hedgehog_modules(model) for p in hh.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = optimizer if optimizer is not None else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()
    history = []
    try:
        with _attention_implementation(model, TEACHER_IMPLEMENTATION):
            recorded = {}  # batch index -> its teacher q, k (reuse_teacher)
            for step, (i, batch) in zip(range(steps), _cycle(enumerate(batches))):
                captured = recorded.get(i) or _record_teacher(model, batch)
                if reuse_teacher:
                    recorded[i] = captured
                loss = sum(m.hedgehog.distillation_loss(q, k, causal=causal, scale=scale, mask=keep)
                           for m, q, k, causal, scale, keep in captured)
                opt.zero_grad()
                loss.backward()
                opt.step()
                history.append(loss.item())
                if callback is not None:
                    callback(step, history[-1])
    finally:
        model.train(was_training)
    return history


# ---------------------------------------------------------------------------------------------
# The recurrent-state cache
# ---------------------------------------------------------------------------------------------
class _StateLayer(CacheLayerMixin):
    """One layer's recurrent state (S, z), None before the prefill. `seen` counts the positions fed
    so far, padding included (what transformers builds masks and positions from)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the prefill makes the state
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Tag the step's keys with this layer (the attention function then updates the state)."""
        self.seen += key_states.shape[2]
        setattr(key_states, _TAG, self)
        return key_states, value_states

    def attend(self, hh: HedgehogAttention, q, k, v, attention_mask, causal: bool, scale):
        """The step's attention through the state: a one-token step with every row real is a
        hedgehog_decode (state updated in place); anything else (the prefill, a chunk, padding)
        runs hedgehog_attention from the state with the padding packed away, and keeps its state."""
        if not causal:
            raise ValueError("pyfast.HedgehogStateCache: needs causal attention layers")
        if hh.window:
            raise ValueError("pyfast.HedgehogStateCache: the sliding-window hybrid (window > 0) keeps raw keys, "
                             "not a recurrent state; generate without this cache (window=0 only)")
        b, _, tq, _ = q.shape
        keep = _keep(attention_mask, b, tq, self.seen, causal)
        keep = None if keep is None or bool(keep[:, -tq:].all()) else keep[:, -tq:]
        if tq == 1 and keep is None and self.state is not None:
            return hh.decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.state).unsqueeze(2)
        out, (s, z) = _run(hh, q, k, v, keep, causal, scale, initial_state=self.state, return_state=True)
        # an inference cache: the state is kept detached (decode steps update it in place)
        self.state = (s.detach().contiguous(), z.detach().contiguous())
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def _select(self, index: torch.Tensor) -> None:
        if self.state is not None:
            s, z = self.state
            index = index.to(s.device)
            self.state = (s.index_select(0, index).contiguous(), z.index_select(0, index).contiguous())

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("pyfast.HedgehogStateCache: a recurrent state cannot be cropped")


class HedgehogStateCache(Cache):
    """A transformers Cache for a converted model (pyfast.hedgehog.convert, window=0) that keeps per
    layer the recurrent state (S [B, Hkv, 2F, Dv], z [B, Hkv, 2F]) float32 instead of keys and
    values: memory independent of the sequence length. The prefill (any multi-token step) runs
    hedgehog_attention(return_state=True) from the state; every one-token step hedgehog_decode,
    updating the state in place. Left-padded batches work (the pads are dropped from the states);
    so do beam search and batch_repeat_interleave / batch_select_indices. Not croppable (no
    assisted decoding), not for window > 0 (ValueError). The state is allocated by the prefill
    (batch size and dtype from it); `reset()` empties the cache for the next prompt.

    Pass it as `cache=` (transformers >= 5.24; `past_key_values=` before) to `model(...)` or
    `model.generate(...)`.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                                num_key_value_heads=2, intermediate_size=64)
        >>> model = pyfast.hedgehog.convert(transformers.LlamaForCausalLM(cfg).eval(), feature_dim=8)
        >>> cache = pyfast.HedgehogStateCache(model)
        >>> out = model.generate(torch.randint(0, 64, (1, 12)), max_new_tokens=8, do_sample=False, cache=cache)
        >>> out.shape, cache.nbytes()       # 2 layers x (S [1, 2, 16, 8] + z [1, 2, 16]) float32
        (torch.Size([1, 20]), 2304)
    """

    def __init__(self, model):
        _converted(model, "HedgehogStateCache")
        modules = [m for _, m in attention_modules(model) if hasattr(m, "hedgehog")]
        windowed = [m.hedgehog.window for m in modules if m.hedgehog.window]
        if windowed:
            raise ValueError(f"pyfast.HedgehogStateCache: needs window=0 (the model was converted with window="
                             f"{windowed[0]}: the hybrid keeps the last window keys, not only a recurrent state)")
        if not all(m.is_causal for m in modules):
            raise ValueError("pyfast.HedgehogStateCache: needs a causal (decoder) model")
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[_StateLayer() for _ in range(n_layers)])

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Every layer's (S, z), None before the prefill."""
        return [layer.state for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the states (constant over decoding)."""
        return sum(t.numel() * t.element_size() for st in self.states() if st is not None for t in st)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence `repeats` times (beam expansion)."""
        check_int("HedgehogStateCache.batch_repeat_interleave", "repeats", repeats, minimum=1)
        for layer in self.layers:
            if layer.state is not None:
                layer._select(torch.arange(layer.state[0].shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (in that order)."""
        for layer in self.layers:
            layer._select(indices)

    def crop(self, max_length: int) -> None:
        raise ValueError("pyfast.HedgehogStateCache: a recurrent state cannot be cropped")
