"""python -m pyfast generate: LNFreeGPT2.generate end to end, timed next to transformers' generate
on the same weights.

Without --checkpoint the model is GPT-2 small with random weights, its LayerNorms switched to
FakeLN and folded (no model hub here); with --checkpoint DIR it is read by
LNFreeGPT2.from_pretrained (a save_pretrained directory, or a GPT-2 in the released LN-free
encoding, which transformers can also load for the comparison). Prompts are random token ids
(there is no tokenizer offline) unless --prompt-ids is given."""

from __future__ import annotations

import sys
import time

import torch


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default=None, help="local model directory (default: random GPT-2 small)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="random prompt length (default 128)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids (one row)")
    p.add_argument("--batch", type=int, default=1, help="rows of random prompts (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize-bits", type=int, default=None, help="CherryQ weights of this many bits (2, 3, 4)")
    p.add_argument("--quantize-group-size", type=int, default=128, help="CherryQ group size (default 128)")
    p.add_argument("--sparse-topk", type=int, default=None, help="Kinetics block top-k decoding with this top-k")
    p.add_argument("--no-compare", action="store_true", help="skip transformers' generate")


def _models(args):
    """(LNFreeGPT2, the transformers model with the same weights or None)."""
    import transformers

    from pyfast import lnfree

    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
        lnfree.fake_layernorm(hf, {n: 1.0 for n in lnfree.fake.layernorms(hf)})
        return lnfree.fold(hf), hf
    model = lnfree.LNFreeGPT2.from_pretrained(args.checkpoint)
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(args.checkpoint, use_safetensors=True).eval().float()
    except (OSError, ValueError, KeyError) as e:  # a save_pretrained directory: no transformers twin
        print(f"(no transformers comparison: {type(e).__name__})", file=sys.stderr)
        hf = None
    return model, hf


def run(args) -> int:
    model, hf = _models(args)
    vocab = model.config["vocab_size"]
    if args.prompt_ids:
        ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    else:
        ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    n = args.max_new_tokens
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed)
    extra = {}
    if args.quantize_bits is not None:
        extra["quantize"] = dict(bits=args.quantize_bits, group_size=args.quantize_group_size)
    if args.sparse_topk is not None:
        extra["sparse"] = dict(topk=args.sparse_topk)

    def progress(step, total):
        print(f"\rLNFreeGPT2.generate: token {step}/{total}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out = model.generate(ids, n, progress=progress, **sampling, **extra)  # stops at the config's EOS
    dt = time.perf_counter() - t0
    print(file=sys.stderr)
    new = out.shape[1] - ids.shape[1]
    print(f"pyfast LNFreeGPT2: {ids.shape[0]} x {new} tokens in {dt:.2f} s = {ids.shape[0] * new / dt:.1f} tokens/s")
    print("first row's new tokens:", out[0, ids.shape[1]:].tolist())
    if hf is not None and not args.no_compare:
        kw = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
            if args.sample else dict(do_sample=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = hf.generate(ids, max_new_tokens=n, pad_token_id=model.config["eos_token_id"], **kw)
            dt_hf = time.perf_counter() - t0
        hf_new = ref.shape[1] - ids.shape[1]
        print(f"transformers generate: {ids.shape[0] * hf_new / dt_hf:.1f} tokens/s; pyfast is "
              f"{ids.shape[0] * new / dt / (ids.shape[0] * hf_new / dt_hf):.2f}x")
        if not args.sample and not extra:
            print("greedy tokens identical:", bool(torch.equal(ref, out)))
    return 0
