"""LN-free inference ("Transformers Don't Need LayerNorm at Inference Time", 2025): switch a GPT-2's
LayerNorms to FakeLN (fixed scale) for the removal fine-tune, fold them exactly into the weights,
and run the result (LNFreeGPT2) on pyfast kernels."""

from pyfast.lnfree.fake import (GPT2_GROUPS, LLAMA_GROUPS, FakeLayerNorm, FakeRMSNorm, LNRemovalSchedule,
                                estimate_ln_scales, fake_layernorm)
from pyfast.lnfree.fold import fold
from pyfast.lnfree.model import LNFreeGPT2
from pyfast.lnfree.ops import linear_bias_gelu, linear_bias_residual

__all__ = ["estimate_ln_scales", "fake_layernorm", "FakeLayerNorm", "FakeRMSNorm", "LNRemovalSchedule", "GPT2_GROUPS",
           "LLAMA_GROUPS", "fold", "LNFreeGPT2",
           "linear_bias_gelu", "linear_bias_residual"]
