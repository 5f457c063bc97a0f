"""enable_sparse_decoding checks every argument (and builds the cache) before it switches the
model: on any error the model keeps its attention implementation and gains no attribute."""

import pytest

transformers = pytest.importorskip("transformers")

import pyfast  # noqa: E402
from pyfast.sparse.model import ATTN_IMPLEMENTATION  # noqa: E402
from test_sparse_hf import _tiny  # noqa: E402

BAD = [
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length=-4), ValueError, "max_length"),
    (dict(max_length="64"), TypeError, "max_length"),
    (dict(max_length=64, batch_size=0), ValueError, "batch_size"),
    (dict(max_length=64, block_size=0), ValueError, "block_size"),
    (dict(max_length=64, topk=-1), ValueError, "topk"),
    (dict(max_length=64, sink_blocks=1.5), TypeError, "sink_blocks"),
    (dict(max_length=64, local_blocks=-1), ValueError, "local_blocks"),
    (dict(max_length=64, no_such_option=1), TypeError, "no_such_option"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_arguments_leave_the_model_unchanged(kwargs, error, match):
    model = _tiny("llama")
    before = model.config._attn_implementation
    with pytest.raises(error, match=match):
        pyfast.enable_sparse_decoding(model, **kwargs)
    assert model.config._attn_implementation == before != ATTN_IMPLEMENTATION
    assert all(getattr(m, "config", model.config)._attn_implementation == before for m in model.modules())
    assert not hasattr(model, "_pyfast_previous_attn")
    pyfast.disable_sparse_decoding(model)  # nothing to undo
    assert model.config._attn_implementation == before


def test_bad_arguments_on_a_switched_model_keep_the_way_back():
    model = _tiny("llama")
    before = model.config._attn_implementation
    pyfast.enable_sparse_decoding(model, max_length=16)
    with pytest.raises(ValueError, match="max_length"):
        pyfast.enable_sparse_decoding(model, max_length=0)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    pyfast.disable_sparse_decoding(model)
    assert model.config._attn_implementation == before
