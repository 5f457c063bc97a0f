"""Hedgehog linear attention: learned softmax-mimicking feature maps (ICLR'24) and the LoLCATs
sliding-window hybrid. Ops: pyfast/hedgehog/ops.py; spec: pyfast/reference/hedgehog.py."""

from pyfast.hedgehog.modules import HedgehogAttention, HedgehogFeatureMap
from pyfast.hedgehog.ops import hedgehog_attention, hedgehog_decode, hedgehog_feature_map, linear_attention

# The transformers integration (pyfast/hedgehog/model.py) is imported on first use: transformers is
# optional.
HF_NAMES = ("HedgehogStateCache", "convert", "unconvert", "softmax_attention", "distill", "hedgehog_modules")

__all__ = [
    "hedgehog_attention",
    "hedgehog_decode",
    "hedgehog_feature_map",
    "linear_attention",
    "HedgehogFeatureMap",
    "HedgehogAttention",
    *HF_NAMES,
]


def __getattr__(name):
    if name in HF_NAMES:
        from pyfast.hedgehog import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
