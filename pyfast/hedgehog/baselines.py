"""Fixed-nonlinearity feature maps: the Hedgehog paper's baselines, for the ablation "learned
softmax-mimicking map vs a fixed one after the same distillation".

    FixedFeatureMap("elu", H, D, F)   phi(x) = elu(x W_h + b_h) + 1      [B, H, T, D] -> [B, H, T, F]
    FixedFeatureMap("t2r", H, D, F)   phi(x) = relu(x W_h + b_h)         [B, H, T, D] -> [B, H, T, 2F]

Both have the same learnable linear map as HedgehogFeatureMap (weight [H, D, out], bias
[H, out]); only the nonlinearity is fixed. They run in plain PyTorch (autograd does the
backward): the fused pyfast ops only compute Hedgehog's map, so HedgehogAttention feeds these
features to pyfast.linear_attention instead.

Output sizes (the recurrent state's feature count): T2R has 2F outputs, like Hedgehog's
[softmax(u), softmax(-u)], so both keep states of the same size; elu+1 keeps the classic F
(Katharopoulos et al.), half that state.

Initialization, chosen so that "before distillation" is each baseline's textbook form:
  * elu, F == D: W = I, b = 0, i.e. exactly elu(x) + 1;
  * t2r, F == D: W = [I, -I], b = 0, i.e. [relu(x), relu(-x)], the relu twin of Hedgehog's
    identity start [softmax(x), softmax(-x)] (no feature is dead at the start: for every entry
    of x one of the two halves is positive);
  * otherwise W uniform in +-1/sqrt(D) (nn.Linear's scale), b = 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyfast._validate import check_choice, check_int

KINDS = ("elu", "t2r")


class FixedFeatureMap(nn.Module):
    """phi(x) = elu(x W_h + b_h) + 1 ("elu") or relu(x W_h + b_h) ("t2r") per head h.

    Args:
        kind: "elu" or "t2r".
        num_heads, head_dim: H and D of the inputs x [B, H, T, D].
        feature_dim: F (default D); the output has F ("elu") or 2F ("t2r") features.
        bias: learn a bias (else None).
        dtype, device: of the parameters; inputs must share the dtype.

    Example:
        >>> from pyfast.hedgehog.baselines import FixedFeatureMap
        >>> fm = FixedFeatureMap("t2r", 2, 16)                         # [relu(x), relu(-x)] at init
        >>> x = torch.randn(1, 2, 5, 16)
        >>> bool(torch.equal(fm(x), torch.cat([x.relu(), (-x).relu()], -1)))
        True
    """

    def __init__(self, kind: str, num_heads: int, head_dim: int, feature_dim: int | None = None, *,
                 bias: bool = True, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        op = "FixedFeatureMap"
        check_choice(op, "kind", kind, KINDS)
        check_int(op, "num_heads", num_heads, minimum=1)
        check_int(op, "head_dim", head_dim, minimum=1)
        feature_dim = head_dim if feature_dim is None else feature_dim
        check_int(op, "feature_dim", feature_dim, minimum=1)
        self.kind, self.num_heads, self.head_dim, self.feature_dim = kind, num_heads, head_dim, feature_dim
        self.out_features = feature_dim if kind == "elu" else 2 * feature_dim
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.out_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_heads, self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The textbook start (module docstring) when F == D, else small random; zero bias."""
        with torch.no_grad():
            if self.feature_dim == self.head_dim:
                eye = torch.eye(self.head_dim)
                init = eye if self.kind == "elu" else torch.cat([eye, -eye], dim=1)
                self.weight.copy_(init.expand(self.num_heads, -1, -1))
            else:
                bound = 1.0 / math.sqrt(self.head_dim)
                self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def _phi(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        u = torch.einsum("bhtd,hdf->bhtf", x, weight)
        if bias is not None:
            u = u + bias[None, :, None, :]
        return F.elu(u) + 1.0 if self.kind == "elu" else torch.relu(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] -> phi(x) [B, H, T, out_features] in x's dtype (non-negative)."""
        return self._phi(x, self.weight, self.bias)

    def features32(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) computed in float32 (the distillation loss's student side)."""
        return self._phi(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")
