"""CherryQLinear: a drop-in for nn.Linear (and transformers' GPT-2 Conv1D) on CherryQ weights,
with the paper's quantization-aware training mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyfast._validate import check_choice, fail
from pyfast.cherryq.format import TENSOR_FIELDS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, CherryQWeight, packed_layout
from pyfast.cherryq.ops import cherryq_matmul
from pyfast.cherryq.quantize import (
    cherry_keep_mask,
    cherryq_quantize,
    default_cherries_per_row,
    fake_quantize,
    quantize_with_cherries,
)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """Weight of an nn.Linear or a GPT-2-style Conv1D as [out_features, in_features]."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if is_conv1d(layer):  # transformers Conv1D stores [in_features, out_features]
        return layer.weight.t()
    fail("CherryQLinear.from_linear", "layer", "an nn.Linear or a transformers Conv1D", type(layer).__name__)


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2


class CherryQLinear(nn.Module):
    """y = x @ W.T + bias with W stored as CherryQ (b-bit groups + fp16 cherries per row).

    Inference: buffers qweight/scales/zeros/cherry_idx/cherry_val (saved in state_dict) and
    `pyfast.cherryq_matmul`. QAT (`start_qat` / `finish_qat`, the paper's method): a float32
    master `weight` is trained; the non-cherry part is fake-quantized with a straight-through
    estimator, the cherries (fixed positions) get their exact gradient; `finish_qat` packs.

    Example:
        >>> q = pyfast.CherryQLinear.from_linear(torch.nn.Linear(1024, 512), bits=3)
        >>> q(torch.randn(4, 1024)).shape
        torch.Size([4, 512])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 3,
        group_size: int = 128,
        cherries_per_row: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        op = "CherryQLinear"
        check_choice(op, "bits", bits, SUPPORTED_BITS)
        check_choice(op, "group_size", group_size, SUPPORTED_GROUP_SIZES)
        if in_features % group_size:
            fail(op, "in_features", f"a multiple of group_size={group_size}", in_features)
        c = default_cherries_per_row(in_features) if cherries_per_row is None else cherries_per_row
        if not 0 <= c <= in_features:
            fail(op, "cherries_per_row", f"in [0, {in_features}]", c)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.cherries_per_row = bits, group_size, c
        n, k = out_features, in_features
        kw = dict(device=device)
        for field, (buf_dtype, shape) in packed_layout(n, k, c, bits, group_size).items():
            self.register_buffer(field, torch.zeros(shape, dtype=buf_dtype, **kw))
        self.cherry_idx.copy_(torch.arange(c, dtype=torch.int32, **kw))  # distinct columns, ascending
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, **kw)) if bias else None
        self.register_parameter("weight", None)  # float32 master weight, only during QAT

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        layer: nn.Module,
        *,
        bits: int = 3,
        group_size: int = 128,
        cherries_per_row: int | None = None,
        impact: torch.Tensor | None = None,
        qat: bool = False,
    ) -> "CherryQLinear":
        """Quantize an nn.Linear or GPT-2 Conv1D. impact [out, in] picks the cherries (default |w|)."""
        w = linear_weight(layer).detach()
        n, k = w.shape
        has_bias = layer.bias is not None
        dtype = layer.bias.dtype if has_bias else torch.float32
        m = cls(k, n, has_bias, bits=bits, group_size=group_size, cherries_per_row=cherries_per_row,
                device=w.device, dtype=dtype)
        m.set_weight(cherryq_quantize(w, bits=bits, group_size=group_size, cherries_per_row=m.cherries_per_row,
                                      impact=impact))
        if has_bias:
            m.bias.data.copy_(layer.bias.detach())
        if qat:
            m.start_qat(w)
        return m

    def set_weight(self, qw: CherryQWeight) -> None:
        if qw.shape != (self.out_features, self.in_features) or (qw.bits, qw.group_size) != (self.bits, self.group_size):
            fail("CherryQLinear.set_weight", "qw", f"shape {(self.out_features, self.in_features)}, bits {self.bits}, "
                 f"group_size {self.group_size}", f"{qw.shape}, bits {qw.bits}, group_size {qw.group_size}")
        for f in TENSOR_FIELDS:
            setattr(self, f, getattr(qw, f).to(self.qweight.device))

    @property
    def quantized_weight(self) -> CherryQWeight:
        return CherryQWeight(*(getattr(self, f) for f in TENSOR_FIELDS), bits=self.bits, group_size=self.group_size)

    # ---- quantization-aware training --------------------------------------------------------
    @property
    def qat(self) -> bool:
        return self.weight is not None

    def start_qat(self, weight: torch.Tensor | None = None) -> None:
        """Train a float32 master weight (default: the dequantized one); cherry positions stay fixed."""
        from pyfast.cherryq.quantize import cherryq_dequantize

        w = cherryq_dequantize(self.quantized_weight) if weight is None else weight.detach().float()
        self.weight = nn.Parameter(w.clone().to(self.qweight.device))
        self.register_buffer("keep_mask", cherry_keep_mask(w.shape, self.cherry_idx, w.device), persistent=False)

    def finish_qat(self) -> None:
        """Pack the trained master weight (same cherry columns) and drop it."""
        if not self.qat:
            return
        self.set_weight(quantize_with_cherries(self.weight.detach().float(), self.cherry_idx, self.bits, self.group_size))
        self.weight = None
        del self.keep_mask

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat:
            w = fake_quantize(self.weight, self.keep_mask, self.bits, self.group_size)
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return cherryq_matmul(x, self.quantized_weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, cherries_per_row={self.cherries_per_row}"
                + (", qat=True" if self.qat else ""))
