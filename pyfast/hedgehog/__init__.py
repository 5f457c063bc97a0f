"""Hedgehog linear attention: learned softmax-mimicking feature maps (ICLR'24) and the LoLCATs
sliding-window hybrid. Ops: pyfast/hedgehog/ops.py; spec: pyfast/reference/hedgehog.py."""

from pyfast.hedgehog.modules import HedgehogAttention, HedgehogFeatureMap
from pyfast.hedgehog.ops import hedgehog_attention, hedgehog_decode, hedgehog_feature_map, linear_attention

__all__ = [
    "hedgehog_attention",
    "hedgehog_decode",
    "hedgehog_feature_map",
    "linear_attention",
    "HedgehogFeatureMap",
    "HedgehogAttention",
]
