"""CherryQ quantizer: per-row fp16 cherries + round-to-nearest b-bit groups for the rest."""

from __future__ import annotations

import math

import torch

from pyfast._validate import check_choice, check_tensor, fail
from pyfast.cherryq.format import PACK, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, CherryQWeight, pack_codes

OP = "cherryq_quantize"
FP16_MAX = 65504.0  # scales, zeros and cherries are stored in float16


def default_cherries_per_row(in_features: int) -> int:
    """The paper keeps ~1/256 of the weights of each row in high precision."""
    return math.ceil(in_features / 256)


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 `x` to float16, toward -inf (direction < 0) or +inf (direction > 0)."""
    h = x.to(torch.float16)
    off = (h.float() < x) if direction > 0 else (h.float() > x)
    step = torch.nextafter(h, torch.full_like(h, math.copysign(math.inf, direction)))
    return torch.where(off, step, h)


def select_cherries(impact: torch.Tensor, count: int) -> torch.Tensor:
    """Columns of the `count` highest-impact weights of each row, ascending, int64 [N, count]."""
    if count == 0:
        return impact.new_zeros(impact.shape[0], 0, dtype=torch.long)
    return impact.topk(count, dim=1).indices.sort(dim=1).values


def group_grid(w: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int):
    """Per-group uniform grid spanning the kept (non-cherry) weights.

    w float32 [N, K], keep bool [N, K]. Returns (scales, zeros) float16 [N, K//group_size] with
    zeros <= min and zeros + (2**bits-1) * scales >= max of each group's kept weights, so that
    round-to-nearest puts every kept weight within half a step of the grid. zeros is rounded
    down and scales up when going to float16 so the fp16 grid still covers the group.
    """
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    m = keep.reshape_as(g)
    mn = torch.where(m, g, torch.inf).amin(-1)
    mx = torch.where(m, g, -torch.inf).amax(-1)
    empty = ~m.any(-1)  # a group made only of cherries: any grid will do
    mn = torch.where(empty, 0.0, mn)
    mx = torch.where(empty, 0.0, mx)
    zeros = _fp16_toward(mn, -1.0)
    scales = _fp16_toward((mx - zeros.float()) / (2**bits - 1), +1.0)
    return scales, zeros


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest codes int64 [N, K] of w on each group's grid."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    s = scales.float().unsqueeze(-1)
    z = zeros.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((g - z) / torch.where(s > 0, s, 1.0)), 0.0)
    return q.clamp_(0, 2**bits - 1).to(torch.int64).reshape(n, k)


def check_quantize_args(weight, bits, group_size, cherries_per_row, impact) -> int:
    check_tensor(OP, "weight", weight, dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=2)
    check_choice(OP, "bits", bits, SUPPORTED_BITS)
    check_choice(OP, "group_size", group_size, SUPPORTED_GROUP_SIZES)
    n, k = weight.shape
    if k % group_size != 0:
        fail(OP, "weight.shape[1] (in_features)", f"a multiple of group_size={group_size}", k)
    if n == 0:
        fail(OP, "weight", "at least one row", f"shape {list(weight.shape)}")
    if cherries_per_row is None:
        cherries_per_row = default_cherries_per_row(k)
    if not isinstance(cherries_per_row, int) or not 0 <= cherries_per_row <= k:
        fail(OP, "cherries_per_row", f"an int in [0, {k}]", cherries_per_row)
    if impact is not None:
        check_tensor(OP, "impact", impact, shape=(n, k), device=weight.device)
    if not torch.isfinite(weight).all():
        fail(OP, "weight", "finite values", "inf or NaN")
    if weight.abs().max() > FP16_MAX:
        fail(OP, "weight", f"values within the float16 range (|w| <= {FP16_MAX})", f"max |w| = {weight.abs().max().item()}")
    return cherries_per_row


@torch.no_grad()
def cherryq_quantize(
    weight: torch.Tensor,
    *,
    bits: int = 3,
    group_size: int = 128,
    cherries_per_row: int | None = None,
    impact: torch.Tensor | None = None,
) -> CherryQWeight:
    """Quantize a weight [N, K] (N out_features, K in_features) with CherryQ.

    Per row, the `cherries_per_row` (default ceil(K/256)) columns of highest `impact`
    (default |weight|; the paper uses mean grad^2, see `pyfast.estimate_impact`) are kept
    in float16; every other weight is rounded to nearest on a uniform `bits`-bit grid per
    group of `group_size` consecutive columns, the grid spanning that group's non-cherry weights.

    Example:
        >>> qw = pyfast.cherryq_quantize(torch.randn(256, 512), bits=3, group_size=128)
        >>> qw.bits_per_weight()  # 3 bits + fp16 scale and zero per 128 + 2 fp16 cherries and indices per row
        3.4375
        >>> y = pyfast.cherryq_matmul(torch.randn(4, 512), qw)  # [4, 256]
    """
    cherries_per_row = check_quantize_args(weight, bits, group_size, cherries_per_row, impact)
    w = weight.float()
    idx = select_cherries(w.abs() if impact is None else impact.float(), cherries_per_row)
    return quantize_with_cherries(w, idx, bits, group_size)


def cherry_keep_mask(shape, idx: torch.Tensor, device) -> torch.Tensor:
    """bool [N, K]: True for the weights that are quantized, False at the cherries `idx` [N, C]."""
    return torch.ones(shape, dtype=torch.bool, device=device).scatter_(1, idx.long(), False)


@torch.no_grad()
def quantize_with_cherries(w: torch.Tensor, idx: torch.Tensor, bits: int, group_size: int) -> CherryQWeight:
    """Quantize float32 w [N, K] keeping the columns idx [N, C] (ascending) of each row as fp16 cherries."""
    keep = cherry_keep_mask(w.shape, idx, w.device)
    scales, zeros = group_grid(w, keep, bits, group_size)
    codes = round_to_grid(w, scales, zeros, bits, group_size).masked_fill_(~keep, 0)
    return CherryQWeight(
        qweight=pack_codes(codes, bits),
        scales=scales,
        zeros=zeros,
        cherry_idx=idx.to(torch.int32).contiguous(),
        cherry_val=w.gather(1, idx.long()).to(torch.float16).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def fake_quantize(w: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize the kept weights of w [N, K] with a straight-through gradient; cherries
    (keep == False) pass through exactly. Used by CherryQ quantization-aware training."""
    with torch.no_grad():
        wd = w.detach().float()
        scales, zeros = group_grid(wd, keep, bits, group_size)
        codes = round_to_grid(wd, scales, zeros, bits, group_size)
        n, k = w.shape
        g = codes.reshape(n, k // group_size, group_size).float()
        deq = (zeros.float().unsqueeze(-1) + g * scales.float().unsqueeze(-1)).reshape(n, k).to(w.dtype)
    return torch.where(keep, w + (deq - w).detach(), w)


def cherryq_dequantize(qw: CherryQWeight) -> torch.Tensor:
    """The dense weight [N, K] float32 that `qw` stands for (cherries included).

    Example:
        >>> w = torch.randn(64, 256)
        >>> qw = pyfast.cherryq_quantize(w, bits=4, group_size=64)
        >>> err = (pyfast.cherryq_dequantize(qw) - w).abs().max()   # at most half a grid step per group
        >>> bool(err < 0.5 * qw.scales.float().max())
        True
    """
    from pyfast.cherryq.ops import check_weight
    from pyfast.reference.cherryq import dequantize

    check_weight("cherryq_dequantize", qw)  # TypeError for a non-CherryQWeight, then the weight's rules

    return dequantize(qw, torch.float32)


assert PACK == 32 and all(g % PACK == 0 for g in SUPPORTED_GROUP_SIZES)
