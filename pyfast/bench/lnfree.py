"""LN-free microbenchmark.

The folded block's linear layers at GPT-2-small sizes (d = 768, MLP 3072) for M = 1, 8, 128
rows: linear_bias_gelu (x [M, 768] -> [M, 3072]) against F.gelu(F.linear) and
linear_bias_residual (x [M, 3072] -> [M, 768], + residual) against F.linear + residual (the
baselines), four weight sets in turn so nothing stays in cache; GB/s counts the weight bytes.

Generation at GPT-2-small shape with random weights (no model hub): a prompt of 128 tokens, 32 and
256 new tokens, batch 1 and 8, greedy, fp32 on the CPU (bf16 on GPUs): transformers' generate of
the FakeLN model (the baseline) against LNFreeGPT2.generate on the same weights folded, and at
batch 1 with CherryQ 3-bit weights. One call = the whole generate; tokens/s = batch * new tokens /
time. The target line also says whether the greedy tokens were identical."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfast._registry import REGISTRY, kernel_backends
from pyfast.bench.runner import Case

ROTATE = 4
PROMPT, NEW = 128, (32, 256)
_SAME: dict[str, bool] = {}  # generate shape -> greedy tokens identical (filled at setup)


def _dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def _linear_cases(device: str, quick: bool) -> list[Case]:
    from pyfast.lnfree import linear_bias_gelu, linear_bias_residual

    dt = _dtype(device)
    d, inner = (256, 1024) if quick else (768, 3072)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for m in ((1, 16) if quick else (1, 8, 128)):
        for op, (n, k) in (("linear_bias_gelu", (inner, d)), ("linear_bias_residual", (d, inner))):
            ws = [(torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dt) for _ in range(ROTATE)]
            b = torch.randn(n, generator=gen).to(device, dt)
            x = torch.randn(m, k, generator=gen).to(device, dt)
            r = torch.randn(m, n, generator=gen).to(device, dt)
            shape = f"M={m} N={n} K={k}"
            nbytes = n * k * ws[0].element_size()
            if op == "linear_bias_gelu":
                base = lambda i, ws=ws, x=x, b=b: F.gelu(F.linear(x, ws[i], b), approximate="tanh")  # noqa: E731
                mine = lambda i, be, ws=ws, x=x, b=b: linear_bias_gelu(x, ws[i], b, backend=be)  # noqa: E731
                label = "F.gelu(F.linear)"
            else:
                base = lambda i, ws=ws, x=x, b=b, r=r: F.linear(x, ws[i], b) + r  # noqa: E731
                mine = lambda i, be, ws=ws, x=x, b=b, r=r: linear_bias_residual(x, ws[i], b, r, backend=be)  # noqa: E731
                label = "F.linear + residual"
            cases.append(Case(op, shape, label, base, ROTATE, bytes=nbytes, flops=2 * m * n * k, baseline=True))
            cases += [Case(op, shape, f"pyfast {be}", lambda i, be=be, mine=mine: mine(i, be), ROTATE, bytes=nbytes,
                           flops=2 * m * n * k) for be in kernel_backends(REGISTRY[op], device)]
    return cases


def models(device: str, quick: bool):
    """(transformers FakeLN GPT-2, its LNFreeGPT2 fold) with random weights: GPT-2 small, or a small
    one for --quick."""
    import transformers

    from pyfast import lnfree

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**(dict(n_layer=2, n_embd=128, n_head=4) if quick else {}))
    model = transformers.GPT2LMHeadModel(cfg).eval()
    lns = lnfree.fake.layernorms(model)
    lnfree.fake_layernorm(model, {n: 1.0 + 0.01 * i for i, n in enumerate(lns)})  # sigma: fixed, varied
    model = model.to(device, _dtype(device))
    model.generation_config.eos_token_id = None  # both run all the new tokens, neither stops at EOS
    return model, lnfree.fold(model)


def _generate_cases(device: str, quick: bool) -> list[Case]:
    model, folded = models(device, quick)
    gen = torch.Generator().manual_seed(1)
    cases = []
    quantized = None
    for batch, new in ((1, 8), (8, 8)) if quick else [(b, n) for b in (1, 8) for n in NEW]:
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=gen).to(device)
        shape = f"{'small' if quick else 'GPT-2 small'} B{batch} prompt {PROMPT} new {new}"

        def hf(i, ids=ids, new=new):  # bound now: the loop moves on before the calls
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)

        def mine(i, ids=ids, new=new):
            return folded.generate(ids, new, eos_token_id=None)

        _SAME[shape] = bool(torch.equal(hf(0), mine(0)))
        rep = dict(max_repeats=3)
        cases.append(Case("generate", shape, "transformers generate (FakeLN)", hf, 1, baseline=True, **rep))
        cases.append(Case("generate", shape, "pyfast LNFreeGPT2", mine, 1, **rep))
        if batch == 1:
            if quantized is None:
                quantized = models(device, quick)[1].quantize_(bits=3, group_size=128)
            cases.append(Case("generate", shape, "pyfast LNFreeGPT2 CherryQ 3b",
                              lambda i, ids=ids, new=new: quantized.generate(ids, new, eos_token_id=None), 1, **rep))
    return cases


def cases(device: str, quick: bool) -> list[Case]:
    return _linear_cases(device, quick) + _generate_cases(device, quick)


def targets(rows: list[dict], device: str) -> list[str]:
    """Generation tokens/s against transformers' in this run (target: >= 3x at batch 1, identical
    greedy tokens)."""
    out = []
    for shape, same in _SAME.items():
        got = {r["impl"]: r["ms"] for r in rows if r["op"] == "generate" and r["shape"] == shape}
        base = got.get("transformers generate (FakeLN)")
        if base is None:
            continue
        batch, new = int(shape.split(" B")[1].split()[0]), int(shape.rsplit(" ", 1)[1])
        for impl, ms in got.items():
            if impl.startswith("pyfast"):
                out.append(f"{impl} {shape}: {batch * new / ms * 1e3:.1f} tokens/s vs transformers "
                           f"{batch * new / base * 1e3:.1f} = {base / ms:.2f}x (target >= 3x at batch 1)"
                           + ("" if "CherryQ" in impl else f", greedy tokens identical: {same}"))
    return out
