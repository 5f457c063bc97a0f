"""python -m pyfast generate on a tiny checkpoint in the released LN-free encoding: it loads,
prints a progress line and tokens/s next to transformers' generate on the same weights, and the
greedy tokens are identical."""

from lnfree_cases import fake_gpt2
from pyfast.__main__ import main
from test_lnfree_model import _write_released_encoding


def test_generate_command(tmp_path, capsys):
    _write_released_encoding(fake_gpt2(d=64), tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-tokens", "10", "--batch", "2",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert "LNFreeGPT2.generate: token 6/6" in out.err
    assert "tokens/s" in out.out and "greedy tokens identical: True" in out.out
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
                 "--sample", "--top-p", "0.9", "--quantize-bits", "4", "--quantize-group-size", "32", "--no-compare"]) == 0
    assert "first row's new tokens" in capsys.readouterr().out
