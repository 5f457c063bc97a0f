"""CherryQ quantizer and storage format: layout round-trip, error bounds, cherries, storage, bad input."""

import math

import pytest
import torch

import pyfast
from pyfast.cherryq.format import pack_codes, unpack_codes
from pyfast.reference.cherryq import dequantize, dequantize_loop


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (7, 96))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, 96 // 32 * bits)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_layout_matches_drawing(bits):
    # code i of a pack set to all-ones, the rest zero: exactly the bits the layout comment draws.
    for i in (0, 5, 15, 16, 31):
        codes = torch.zeros(1, 32, dtype=torch.long)
        codes[0, i] = 2**bits - 1
        words = [w & 0xFFFFFFFF for w in pack_codes(codes, bits)[0].tolist()]
        want = [0] * bits
        if bits == 4:
            want[i // 8] = 15 << (4 * (i % 8))
        else:
            want[i // 16] = 3 << (2 * (i % 16))
            if bits == 3:
                want[2] = 1 << i
        assert words == want


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_two_forms_agree(bits):
    qw = pyfast.cherryq_quantize(torch.randn(5, 128), bits=bits, group_size=64, cherries_per_row=3)
    assert torch.equal(dequantize(qw, torch.float64), dequantize_loop(qw))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_within_half_step_and_cherries_exact(bits, group_size, dtype):
    n, k = 37, 3 * group_size
    w = (torch.randn(n, k) * torch.rand(n, 1) * 3 + torch.randn(n, 1)).to(dtype)
    w[3, 7] = 40.0  # an outlier: must become a cherry (default impact = |w|)
    qw = pyfast.cherryq_quantize(w, bits=bits, group_size=group_size)
    c = math.ceil(k / 256)
    assert qw.cherry_idx.shape == (n, c) and qw.cherry_val.dtype == torch.float16
    assert 7 in qw.cherry_idx[3].tolist()
    assert (qw.cherry_idx[:, 1:] > qw.cherry_idx[:, :-1]).all()
    d = pyfast.cherryq_dequantize(qw).double()
    wd = w.double()
    cherry = torch.zeros(n, k, dtype=torch.bool).scatter_(1, qw.cherry_idx.long(), True)
    # cherries: float16 precision
    assert torch.equal(d[cherry], wd[cherry].half().double())
    # everything else: within half a grid step of the original (plus fp32 rounding slack)
    step = qw.scales.double().repeat_interleave(group_size, 1)
    err = (d - wd).abs()
    assert (err[~cherry] <= step[~cherry] * (0.5 + 1e-4) + 1e-7).all(), (err / step)[~cherry].max()
    # the grid spans the non-cherry values: code 0 <= min and top code >= max of each group
    g = wd.masked_fill(cherry, float("nan")).reshape(n, -1, group_size)
    lo, hi = g.nan_to_num(float("inf")).amin(-1), g.nan_to_num(float("-inf")).amax(-1)
    z, s = qw.zeros.double(), qw.scales.double()
    top = z + (2**bits - 1) * s
    assert (z <= lo).all() and (top >= hi - 1e-6 * (hi - z).abs() - 1e-7).all()


def test_impact_picks_cherries():
    w = torch.randn(4, 256)
    impact = torch.zeros(4, 256)
    impact[:, 100] = 1.0
    qw = pyfast.cherryq_quantize(w, bits=3, group_size=128, cherries_per_row=1, impact=impact)
    assert qw.cherry_idx.flatten().tolist() == [100] * 4


def test_storage_at_most_3_5_bits():
    qw = pyfast.cherryq_quantize(torch.randn(256, 4096), bits=3, group_size=128)
    assert qw.bits_per_weight() <= 3.5


def test_constant_group_and_all_cherry_group():
    w = torch.full((2, 64), 0.3)
    qw = pyfast.cherryq_quantize(w, bits=2, group_size=64, cherries_per_row=0)
    assert (pyfast.cherryq_dequantize(qw) - 0.3).abs().max() < 1e-3
    qw = pyfast.cherryq_quantize(torch.randn(2, 64), bits=2, group_size=64, cherries_per_row=64)
    assert torch.isfinite(pyfast.cherryq_dequantize(qw)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.randn(4, 100)), "multiple of group_size"),
        (dict(weight=torch.randn(4, 128), bits=3.0), "bits"),
        (dict(weight=[[1.0] * 128]), "weight"),
        (dict(weight=torch.randn(4, 128), bits=5), "bits"),
        (dict(weight=torch.randn(4, 128), bits=8), "bits"),
        (dict(weight=torch.randn(4, 128), group_size=100), "group_size"),
        (dict(weight=torch.randn(128)), "weight"),
        (dict(weight=torch.randint(0, 3, (4, 128))), "weight"),
        (dict(weight=torch.randn(4, 128), impact=torch.randn(4, 64)), "impact"),
        (dict(weight=torch.randn(4, 128), cherries_per_row=-1), "cherries_per_row"),
        (dict(weight=torch.full((4, 128), float("nan"))), "finite"),
        (dict(weight=torch.full((4, 128), 1e6)), "float16 range"),
    ],
)
def test_bad_input(kwargs, match):
    """ValueError for a wrong shape or value, TypeError for a wrong type or dtype."""
    w = kwargs.pop("weight")
    wrong_type = isinstance(kwargs.get("bits"), float) or not isinstance(w, torch.Tensor) or not w.is_floating_point()
    with pytest.raises(TypeError if wrong_type else ValueError, match=match):
        pyfast.cherryq_quantize(w, **kwargs)
