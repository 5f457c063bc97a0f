"""Hedgehog modules: the learnable feature map and a drop-in attention layer with the paper's
attention-distillation loss ("The Hedgehog & the Porcupine", ICLR'24; the sliding-window hybrid of
LoLCATs).

    HedgehogFeatureMap(H, D, F)     weight [H, D, F], bias [H, F]: x [B, H, T, D] -> phi(x) [B, H, T, 2F]
    HedgehogAttention(Hq, Hkv, D, F, window=0, feature_map="hedgehog")
                                    ("elu" / "t2r": the paper's fixed-nonlinearity baselines, baselines.py)
        .forward(q, k, v)           pyfast.hedgehog_attention with the module's feature maps
        .decode(q, k, v, state)     pyfast.hedgehog_decode (one token, state updated in place)
        .distillation_loss(q, k)    soft cross-entropy between softmax attention (the teacher) and
                                    the module's normalized linear (or hybrid) attention weights

Every module takes `backend` (None: the device's default kernels; "reference", "cpu", ...) and
passes it to the pyfast ops. The distillation loss is plain PyTorch (O(T^2) memory, float32): it
is meant for the short sequences of the distillation stage and needs no kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyfast._validate import check_choice, check_int, check_tensor, fail
from pyfast.hedgehog.baselines import FixedFeatureMap
from pyfast.hedgehog.ops import hedgehog_attention, hedgehog_decode, hedgehog_feature_map, linear_attention

FEATURE_MAPS = ("hedgehog", "elu", "t2r")  # HedgehogAttention(feature_map=...); baselines.py has the last two

_TINY = 1e-30  # floor of a linear-attention weight under the log (float32 keeps it; avoids log(0))


class HedgehogFeatureMap(nn.Module):
    """phi(x) = cat(softmax(x W_h + b_h), softmax(-(x W_h + b_h))) per head h (pyfast.hedgehog_feature_map).

    Args:
        num_heads, head_dim: H and D of the inputs x [B, H, T, D].
        feature_dim: F (default D); the output has 2F features.
        bias: learn a bias [H, F] (else None).
        backend: passed to pyfast.hedgehog_feature_map (None: the device's default kernels).
        dtype, device: of the parameters; inputs must share the dtype.

    Initialization (the paper's): with F == D every head's weight is the identity and the bias zero,
    so phi(x) = cat(softmax(x), softmax(-x)) at the start; with F != D the weight is small random,
    uniform in +-1/sqrt(D) (nn.Linear's default scale, so u has about x's per-entry scale), and
    the bias zero.

    Example:
        >>> fm = pyfast.HedgehogFeatureMap(2, 16)                      # identity init (F = D = 16)
        >>> x = torch.randn(1, 2, 5, 16)
        >>> phi = fm(x)
        >>> phi.shape
        torch.Size([1, 2, 5, 32])
        >>> bool(torch.allclose(phi[..., :16], x.softmax(-1), atol=1e-6))
        True
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, *, bias: bool = True,
                 backend: str | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        check_int("HedgehogFeatureMap", "num_heads", num_heads, minimum=1)
        check_int("HedgehogFeatureMap", "head_dim", head_dim, minimum=1)
        feature_dim = head_dim if feature_dim is None else feature_dim
        check_int("HedgehogFeatureMap", "feature_dim", feature_dim, minimum=1)
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.out_features = 2 * feature_dim
        self.backend = backend
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, **kw))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialization (class docstring): identity when F == D, else small random; zero bias."""
        with torch.no_grad():
            if self.feature_dim == self.head_dim:
                self.weight.copy_(torch.eye(self.head_dim).expand(self.num_heads, -1, -1))
            else:
                bound = 1.0 / math.sqrt(self.head_dim)
                self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] -> phi(x) [B, H, T, 2F] in x's dtype."""
        return hedgehog_feature_map(x, self.weight, self.bias, backend=self.backend)

    def features32(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) in plain PyTorch, float32, differentiable (the distillation loss's student side)."""
        u = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        if self.bias is not None:
            u = u + self.bias.float()[None, :, None, :]
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class HedgehogAttention(nn.Module):
    """Hedgehog linear attention with learnable feature maps: a drop-in for the softmax attention
    of a layer, given its (post-RoPE) q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv].

    Args:
        num_heads, num_kv_heads, head_dim: Hq, Hkv (Hq % Hkv == 0: GQA) and D.
        feature_dim: F of both feature maps (default D); states have 2F features (F with "elu").
        feature_map: "hedgehog" (the learned softmax-mimicking map, fused into the pyfast
            Hedgehog ops) or a baseline with a fixed nonlinearity after the same learnable linear
            map (pyfast/hedgehog/baselines.py): "elu" (elu(xW + b) + 1, F features, exactly
            elu(x) + 1 at init) or "t2r" (relu(xW + b), 2F features, [relu(x), relu(-x)] at init).
            The baselines' features are computed in PyTorch and fed to pyfast.linear_attention
            (and its state for decode); they have no sliding-window hybrid (window must be 0).
        window: 0 for pure linear attention; > 0 for the LoLCATs sliding-window hybrid (exact
            softmax over the last `window` keys, linear attention over the older ones; causal only).
        eps: the denominator's epsilon.
        bias: feature maps with a bias.
        backend: passed to the pyfast ops (None: the device's default kernels).
        dtype, device: of the feature-map parameters (the hybrid's mixing factor is float32).

    Submodules and parameters: `q_map` (Hq heads), `k_map` (Hkv heads: one per KV head, shared by
    its query group), and with window > 0 `window_factor` [Hq] float32, the LoLCATs-style
    learnable mixing factor: with s = sigmoid(window_factor), the softmax part is weighted by
    beta = 2 s and the linear part by alpha = 2 (1 - s). It starts at 0, i.e. alpha = beta = 1
    exactly (the ops' defaults); the weights stay positive (no sign flip of the denominator) and
    only their ratio is learned, which is all the normalized output depends on (up to eps).

    Example:
        >>> attn = pyfast.HedgehogAttention(4, 2, 16, feature_dim=8)   # 4 query heads, 2 KV heads
        >>> q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
        >>> out, (S, z) = attn(q, k, v, return_state=True)
        >>> out.shape, S.shape, z.shape
        (torch.Size([1, 4, 10, 16]), torch.Size([1, 2, 16, 16]), torch.Size([1, 2, 16]))
        >>> with torch.no_grad():
        ...     y = attn.decode(torch.randn(1, 4, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 16), (S, z))
        >>> y.shape
        torch.Size([1, 4, 16])
        >>> loss = attn.distillation_loss(q, k)                          # train the feature maps on it
        >>> loss.backward()
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, feature_dim: int | None = None, *,
                 window: int = 0, feature_map: str = "hedgehog", eps: float = 1e-6, bias: bool = True,
                 backend: str | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        op = "HedgehogAttention"
        check_int(op, "num_heads", num_heads, minimum=1)
        check_int(op, "num_kv_heads", num_kv_heads, minimum=1)
        if num_heads % num_kv_heads:
            fail(op, "num_kv_heads", f"a divisor of num_heads = {num_heads}", num_kv_heads)
        check_int(op, "window", window, minimum=0)
        check_choice(op, "feature_map", feature_map, FEATURE_MAPS)
        if window and feature_map != "hedgehog":
            fail(op, "window", f"0 with feature_map={feature_map!r} (the hybrid op fuses Hedgehog's map only)", window)
        if not (math.isfinite(eps) and eps >= 0):
            fail(op, "eps", "a finite float >= 0", repr(eps))
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window, self.feature_map, self.eps, self._backend = window, feature_map, float(eps), backend
        kw = dict(bias=bias, dtype=dtype, device=device)
        if feature_map == "hedgehog":
            self.q_map = HedgehogFeatureMap(num_heads, head_dim, feature_dim, backend=backend, **kw)
            self.k_map = HedgehogFeatureMap(num_kv_heads, head_dim, feature_dim, backend=backend, **kw)
        else:
            self.q_map = FixedFeatureMap(feature_map, num_heads, head_dim, feature_dim, **kw)
            self.k_map = FixedFeatureMap(feature_map, num_kv_heads, head_dim, feature_dim, **kw)
        self.feature_dim = self.q_map.feature_dim
        if window > 0:
            self.window_factor = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device))
        else:
            self.register_parameter("window_factor", None)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        """Set the backend of this module and its feature maps (the baselines' maps are plain PyTorch)."""
        self._backend = value
        if self.feature_map == "hedgehog":
            self.q_map.backend = self.k_map.backend = value

    @property
    def alpha(self) -> torch.Tensor | None:
        """The linear part's weight [Hq] float32 (None with window == 0)."""
        if self.window_factor is None:
            return None
        return 2.0 * torch.sigmoid(-self.window_factor)

    @property
    def beta(self) -> torch.Tensor | None:
        """The softmax part's weight [Hq] float32 (None with window == 0)."""
        if self.window_factor is None:
            return None
        return 2.0 * torch.sigmoid(self.window_factor)

    def _weights(self):
        return self.q_map.weight, self.k_map.weight, self.q_map.bias, self.k_map.bias

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                initial_state=None, return_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                scale: float | None = None):
        """pyfast.hedgehog_attention of q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] with this
        module's feature maps (and window, alpha, beta, eps): out [B, Hq, T, Dv], and with
        return_state (window == 0 only) (out, (S, z)), S [N, Hkv, 2F, Dv], z [N, Hkv, 2F] float32.
        scale (default 1/sqrt(D)) is the softmax part's, so it only matters with window > 0.
        The baselines: pyfast.linear_attention of their features (S, z then have F' = out_features)."""
        if self.feature_map != "hedgehog":
            return linear_attention(self.q_map(q), self.k_map(k), v, causal=causal, eps=self.eps,
                                    initial_state=initial_state, return_state=return_state, cu_seqlens=cu_seqlens,
                                    backend=self.backend)
        return hedgehog_attention(q, k, v, *self._weights(), causal=causal, eps=self.eps, initial_state=initial_state,
                                  return_state=return_state, window=self.window, alpha=self.alpha, beta=self.beta,
                                  scale=scale, cu_seqlens=cu_seqlens, backend=self.backend)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        """One token (q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv]) with the recurrent state
        (S [B, Hkv, 2F, Dv], z [B, Hkv, 2F]) float32, updated in place: pyfast.hedgehog_decode.
        window == 0 only (the hybrid's decode needs the last window raw keys, not kept here).
        The op has no backward: call it under torch.no_grad(). The baselines (feature_map "elu",
        "t2r") take one step of pyfast.linear_attention from the state and copy the new state back
        into it (S [B, Hkv, F', Dv], z [B, Hkv, F'] with F' = out_features)."""
        if self.window:
            fail("HedgehogAttention.decode", "window", "0 (the sliding-window hybrid has no recurrent decode step)",
                 self.window)
        if self.feature_map != "hedgehog":
            s, z = state
            out, (s1, z1) = linear_attention(self.q_map(q[:, :, None]), self.k_map(k[:, :, None]), v[:, :, None],
                                             eps=self.eps, initial_state=(s, z), return_state=True,
                                             backend=self.backend)
            s.copy_(s1)
            z.copy_(z1)
            return out[:, :, 0]
        return hedgehog_decode(q, k, v, *self._weights(), state=state, eps=self.eps, backend=self.backend)

    # ------------------------------------------------------------------------------ distillation
    def attention_weights(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized weights a [B, Hq, T, T] (float32, plain PyTorch, differentiable in the
        parameters) of this module's attention: out_t = sum_s a_ts v_s equals forward()'s output.

        window == 0: a_ts = phi_q(q_t) . phi_k(k_s) / (sum_s' phi_q(q_t) . phi_k(k_s') + eps) over the
        allowed keys s (s <= t when causal); window > 0: the hybrid's weights (beta e_ts for the last
        window keys, alpha phi_q . phi_k for older ones, over their sum + eps). mask: optional bool
        [B, T], False for padding keys (never attended)."""
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        if self.window and not causal:
            fail("HedgehogAttention", "causal", "True with window > 0 (the sliding window is causal)", causal)
        allowed = self._allowed(b, t, causal, mask, q.device)  # [B, 1, T, T]
        pq = self.q_map.features32(q)
        pk = self.k_map.features32(k).repeat_interleave(hq // hkv, dim=1)
        lin = (pq @ pk.transpose(-1, -2))  # [B, Hq, T, T]
        if not self.window:
            w = lin.masked_fill(~allowed, 0.0)
        else:
            pos = torch.arange(t, device=q.device)
            near = (pos[:, None] - pos[None, :]) < self.window  # s > t - window (with s <= t from allowed)
            logits = self._logits(q, k, scale).masked_fill(~(allowed & near), float("-inf"))
            m = logits.amax(dim=-1, keepdim=True)
            e = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
            w = (self.beta[None, :, None, None] * e
                 + self.alpha[None, :, None, None] * lin.masked_fill(~(allowed & ~near), 0.0))
        return w / (w.sum(dim=-1, keepdim=True) + self.eps)

    def distillation_loss(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's attention-distillation loss: the soft cross-entropy -sum_s p_ts log a_ts between
        the softmax attention weights p = softmax(scale q k^T) (the teacher, with the same causal /
        padding mask; detached) and this module's normalized weights a (`attention_weights`; the
        hybrid's with window > 0), averaged over queries (padding queries excluded), heads and the
        batch. q [B, Hq, T, D], k [B, Hkv, T, D] (GQA: each KV head serves its query group); scale
        defaults to 1/sqrt(D); mask: optional bool [B, T], False for padding. A float32 scalar,
        differentiable in the feature maps (and the hybrid's mixing factor); q and k are detached.
        Plain PyTorch, O(B Hq T^2) memory: for the short sequences of distillation."""
        check_tensor("HedgehogAttention.distillation_loss", "q", q, ndim=4)
        check_tensor("HedgehogAttention.distillation_loss", "k", k, ndim=4)
        q, k = q.detach(), k.detach()
        b, _, t, _ = q.shape
        allowed = self._allowed(b, t, causal, mask, q.device)
        with torch.no_grad():
            teacher = torch.softmax(self._logits(q, k, scale).masked_fill(~allowed, float("-inf")), dim=-1)
            rows = allowed.any(dim=-1)  # [B, 1, T]: queries with at least one key (not padding)
            if mask is not None:
                rows = rows & mask.to(q.device, torch.bool)[:, None, :]
            teacher = torch.nan_to_num(teacher, nan=0.0)  # rows without any key
        a = self.attention_weights(q, k, causal=causal, scale=scale, mask=mask)
        log_a = torch.log(a.clamp_min(_TINY)).masked_fill(~allowed, 0.0)
        ce = -(teacher * log_a).sum(dim=-1)  # [B, Hq, T]
        rows = rows.expand_as(ce)
        return ce[rows].mean() if bool(rows.any()) else ce.sum() * 0.0

    def _logits(self, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
        """scale q k^T [B, Hq, T, T] float32 (k expanded to the query heads)."""
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        kx = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return (q.float() @ kx.transpose(-1, -2)) * scale

    @staticmethod
    def _allowed(b: int, t: int, causal: bool, mask: torch.Tensor | None, device) -> torch.Tensor:
        """bool [B or 1, 1, T, T]: query t may attend key s."""
        allowed = torch.ones(t, t, dtype=torch.bool, device=device)
        if causal:
            allowed = allowed.tril()
        allowed = allowed[None, None]
        if mask is not None:
            check_tensor("HedgehogAttention", "mask", mask, shape=(b, t))
            allowed = allowed & mask.to(device, torch.bool)[:, None, None, :]
        return allowed

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"feature_dim={self.feature_dim}, feature_map={self.feature_map!r}, window={self.window}, "
                f"eps={self.eps}, backend={self.backend!r}")
