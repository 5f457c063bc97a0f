"""Every public function and class of pyfast shows an example in its docstring, and every example
runs as written (doctest, with `torch` and `pyfast` imported)."""

import doctest
import inspect

import pytest
import torch

import pyfast

PUBLIC = sorted(name for name in pyfast.__all__ if callable(getattr(pyfast, name)))
# Classes whose examples live in the function that makes them (cherryq_quantize makes a
# CherryQWeight, enable_sparse_decoding a SparseDecodingCache).
EXAMPLE_ELSEWHERE = {"CherryQWeight": "cherryq_quantize", "SparseDecodingCache": "enable_sparse_decoding"}


def _examples(name: str) -> doctest.DocTest:
    obj = inspect.unwrap(getattr(pyfast, name))
    return doctest.DocTestParser().get_doctest(inspect.getdoc(obj) or "", {"torch": torch, "pyfast": pyfast},
                                               f"pyfast.{name}", None, 0)


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_example_runs(name):
    test = _examples(EXAMPLE_ELSEWHERE.get(name, name))
    assert test.examples, f"pyfast.{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    with torch.no_grad() if name in ("enable_sparse_decoding",) else torch.enable_grad():
        result = runner.run(test)
    assert result.failed == 0, f"pyfast.{name}: {result.failed} of {result.attempted} examples failed (see output)"
