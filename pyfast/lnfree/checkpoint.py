"""Reading LN-free checkpoints from a local directory (safetensors only, never pickle):
- written by LNFreeGPT2.save_pretrained: config.json with "pyfast_lnfree": 1, the folded tensors;
- a transformers GPT-2 directory in the released LN-free encoding: every LayerNorm has eps >= 1e10
  (1e12 in the released models) and weight gamma * sqrt(eps) / sigma, so it computes
  (x - mean) * gamma / sigma + beta to within var / (2 eps): folded here in float64.
Everything is read and checked before a model is built (nothing half-loaded).
"""

from __future__ import annotations

import json
import math
import os

import torch

from pyfast._validate import fail
from pyfast.lnfree.fold import ENCODED_EPS_MIN, fold_gpt2_tensors, gpt2_config_of, ln_scale_of_encoded

CONFIG_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "attn_scales")


def _fail(arg: str, expected: str, got) -> None:
    fail("lnfree.LNFreeGPT2.from_pretrained", arg, expected, got)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        _fail("directory", "a local model directory with config.json", repr(str(directory)))
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        _fail("config.json", "valid JSON", f"{type(e).__name__}: {e}")
    if not isinstance(cfg, dict):
        _fail("config.json", "a JSON object", type(cfg).__name__)
    return cfg


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
        _fail("weights", "*.safetensors files (pickle checkpoints are never read)", others or "none")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(os.path.join(directory, f)))
        except (SafetensorError, OSError, ValueError) as e:
            _fail(f"{f}", "a readable safetensors file", f"{type(e).__name__}: {e}")
    return tensors


def _native(cfg: dict, tensors: dict) -> tuple[dict, dict]:
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        _fail("config.json", f"the LNFreeGPT2 keys {CONFIG_KEYS}", f"missing {missing}")
    for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            _fail(f"config.json {k}", "a positive int", repr(cfg[k]))
    if cfg["n_embd"] % cfg["n_head"]:
        _fail("config.json n_embd", f"a multiple of n_head = {cfg['n_head']}", cfg["n_embd"])
    scales = cfg["attn_scales"]
    if not isinstance(scales, list) or len(scales) != cfg["n_layer"] or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in scales):
        _fail("config.json attn_scales", f"{cfg['n_layer']} positive floats (one per layer)", repr(scales)[:80])
    config = {k: cfg[k] for k in CONFIG_KEYS} | {"eos_token_id": cfg.get("eos_token_id")}
    return config, tensors


def _encoded_gpt2(cfg: dict, tensors: dict) -> tuple[dict, dict]:
    config = gpt2_config_of(cfg)
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    if eps < ENCODED_EPS_MIN:
        _fail("a GPT-2 checkpoint in the LN-free encoding", f"(LayerNorm eps >= {ENCODED_EPS_MIN:g}; the released "
              "models use 1e12): this one has real LayerNorms; convert it with estimate_ln_scales, fake_layernorm, "
              "the removal fine-tune and fold", f"layer_norm_epsilon = {eps:g}")
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""

    def get(name):
        key = prefix + name
        if key not in tensors:
            _fail("tensor", repr(key), "missing")
        return tensors[key]

    def ln(name):
        return ln_scale_of_encoded(get(name + ".weight"), get(name + ".bias"), eps)

    d, inner, v, p = config["n_embd"], config["n_inner"], config["vocab_size"], config["n_positions"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (p, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(config["n_layer"]):
        h = f"h.{i}."
        shapes |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                   h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
                   h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                   h + "mlp.c_fc.weight": (d, inner), h + "mlp.c_fc.bias": (inner,),
                   h + "mlp.c_proj.weight": (inner, d), h + "mlp.c_proj.bias": (d,)}
    for name, shape in shapes.items():
        t = get(name)
        if tuple(t.shape) != shape:
            _fail(f"tensor {prefix + name!r}", f"shape {list(shape)} (from config.json)", f"shape {list(t.shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            _fail(f"tensor {prefix + name!r}", "finite float values", t.dtype)
    head = tensors.get("lm_head.weight")
    if head is not None:
        if tuple(head.shape) != (v, d):
            _fail("tensor 'lm_head.weight'", f"shape {[v, d]}", f"shape {list(head.shape)}")
        if torch.equal(head, get("wte.weight")):
            head = None  # tied, as GPT-2 is
    return config, fold_gpt2_tensors(config, get, ln, head)


def load_directory(directory) -> tuple[dict, dict, torch.dtype]:
    """(LNFreeGPT2 config, its tensors, the checkpoint's float dtype) of a local directory."""
    directory = os.fspath(directory)
    cfg = _read_config(directory)
    tensors = _read_tensors(directory)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    file_dtype = torch.float32 if dtypes != {torch.float16} and dtypes != {torch.bfloat16} else dtypes.pop()
    if cfg.get("pyfast_lnfree"):
        config, out = _native(cfg, tensors)
    else:
        config, out = _encoded_gpt2(cfg, tensors)
    return config, out, file_dtype
