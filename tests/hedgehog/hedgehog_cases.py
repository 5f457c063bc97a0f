"""Random Hedgehog problems shared by the hedgehog tests: q/k/v with per-head feature-map weights
and biases, float32 states, packed segment offsets, non-negative features for linear_attention,
and the odd shape lists."""

from __future__ import annotations

import torch

from conftest import DTYPE_IDS, shape_id  # noqa: F401  (re-exported: the family's tests import them from here)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (B, Hq, Hkv, T, D, F, Dv): odd sizes, GQA ratios 1, 3 and 2, T across one prefix-sum chunk (64).
SHAPES = [
    (2, 3, 3, 13, 5, 3, 7),
    (1, 6, 2, 70, 9, 4, 3),
    (3, 4, 2, 1, 6, 5, 4),
    (1, 1, 1, 31, 16, 8, 16),
]


def cu_seqlens(*lengths, device="cpu") -> torch.Tensor:
    """int32 [N + 1] offsets of packed segments of the given lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_state(n, hkv, f2, dv, *, dtype=torch.float32, seed=0, device="cpu"):
    """(S [n, Hkv, f2, Dv], z [n, Hkv, f2]): S random, z positive (as a sum of features is)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, hkv, f2, dv, generator=g)
    z = torch.rand(n, hkv, f2, generator=g) * 2 + 0.1
    return s.to(dtype).to(device), z.to(dtype).to(device)


def make_problem(b, hq, hkv, t, d, f, dv, dtype=torch.float32, seed=0, *, bias=True, state=False, lengths=None,
                 window_weights=False, device="cpu", state_dtype=torch.float32):
    """A dict of hedgehog_attention arguments: q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv],
    q_weight [Hq, D, F], k_weight [Hkv, D, F] (~N(0, 1/D), so u ~ N(0, 1)), q_bias/k_bias (with
    `bias`), initial_state (with `state`: one per sequence, or per segment with `lengths`),
    cu_seqlens (with `lengths`, which must sum to T; B must be 1) and alpha, beta [Hq] (with
    `window_weights`, in (0.25, 1.25))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    p = dict(
        q=rnd(b, hq, t, d), k=rnd(b, hkv, t, d), v=rnd(b, hkv, t, dv),
        q_weight=rnd(hq, d, f, scale=d ** -0.5), k_weight=rnd(hkv, d, f, scale=d ** -0.5),
    )
    if bias:
        p.update(q_bias=rnd(hq, f, scale=0.5), k_bias=rnd(hkv, f, scale=0.5))
    if lengths is not None:
        assert b == 1 and sum(lengths) == t, (b, lengths, t)
        p["cu_seqlens"] = cu_seqlens(*lengths, device=device)
    if state:
        n = b if lengths is None else len(lengths)
        p["initial_state"] = make_state(n, hkv, 2 * f, dv, dtype=state_dtype, seed=seed + 1, device=device)
    if window_weights:
        p["alpha"] = (torch.rand(hq, generator=g) + 0.25).to(state_dtype).to(device)
        p["beta"] = (torch.rand(hq, generator=g) + 0.25).to(state_dtype).to(device)
    return p


def make_features(b, h, t, f, *, dtype=torch.float64, seed=0, device="cpu"):
    """Non-negative features [B, H, T, F'] for linear_attention (uniform in [0, 1))."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, t, f, generator=g).to(dtype).to(device)


def to64(p: dict) -> dict:
    """The same problem in float64 (tensors and state tuples; cu_seqlens untouched)."""
    def conv(x):
        if isinstance(x, tuple):
            return tuple(conv(y) for y in x)
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    return {key: conv(val) for key, val in p.items()}
