"""The op registry itself, for every registered op: opcheck and torch.compile for each backend that
runs here, the same kernel from torch.ops.pyfast.<op> as from pyfast.<op>(backend=None), the
default rule on CUDA, and the public function's fast path equal to the dispatcher path."""

from __future__ import annotations

import pytest
import torch

import op_cases
from pyfast import _ops, _registry

OPS = sorted(_registry.REGISTRY)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(device: str, a: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def _twice(make) -> tuple[dict, dict]:
    """Two equal valid calls (the builders draw random inputs)."""
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(0)
    return a, make()


def test_every_op_declares_everything():
    for name, op in _registry.REGISTRY.items():
        assert op.overload is getattr(torch.ops.pyfast, name).default
        assert {"cpu", "reference"} <= set(op.impls), name
        assert callable(op.check) and callable(op.fake), name
        assert op.arg_names and op.tensor_args, name


def _device(backend: str) -> str:
    """Where `backend` runs: CUDA for "cuda", and for "triton" on a GPU (the interpreter runs CPU tensors)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _op_backends(skip=()):
    """(op, backend, variant) for every op, each of its valid calls (op_cases.calls) and each of its
    backends that runs here."""
    return [pytest.param(op, b, var, id="-".join(x for x in (op, var, b) if x)) for op in OPS
            for var in op_cases.calls(op) for b in op_cases.BACKENDS
            if b in _registry.REGISTRY[op].impls and b not in skip]


@pytest.mark.parametrize("op, backend, variant", _op_backends())
def test_opcheck(op, backend, variant):
    make, _ = op_cases.calls(op)[variant]
    a = make()
    opdef = _registry.REGISTRY[op]
    if opdef.autograd is not None:  # exercise the registered backward too
        first = opdef.arg_names[0]
        a[first] = a[first].clone().requires_grad_()
    device = _device(backend)
    torch.library.opcheck(opdef.overload, tuple(op_cases.schema_order(op, _on(device, a))), {"backend": backend})


@pytest.mark.parametrize("op, backend, variant", _op_backends())
def test_compile_fullgraph(op, backend, variant):
    """pyfast.<op> traced whole by torch.compile gives the eager result (the rules run in the fake
    impl while tracing, and again at run time)."""
    make, public = op_cases.calls(op)[variant]
    torch._dynamo.reset()  # one lambda compiled per (op, backend): keep under dynamo's recompile limit
    device = _device(backend)
    a_eager, a_compiled = (_on(device, a) for a in _twice(make))
    compiled = torch.compile(lambda a: public(a, backend), fullgraph=True, backend="aot_eager")
    want, got = public(a_eager, backend), compiled(a_compiled)
    if want is None:  # an in-place op (append_kv): compare what it wrote
        opdef = _registry.REGISTRY[op]
        for k in (opdef.arg_names[i] for i in opdef.written):
            torch.testing.assert_close(a_compiled[k], a_eager[k], equal_nan=True)
    else:
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_raw_op_runs_the_public_default(op, device, monkeypatch):
    """torch.ops.pyfast.<op> and pyfast.<op>(backend=None) run the same implementation (on CUDA:
    the fastest kernel, never the reference), and the public fast path equals the dispatcher path."""
    opdef = _registry.REGISTRY[op]
    ran = []
    spied = {name: (lambda *args, _f=fn, _n=name: ran.append(_n) or _f(*args)) for name, fn in opdef.impls.items()}
    monkeypatch.setattr(opdef, "impls", spied)
    make, public = op_cases.OPS[op]
    a1, a2 = (_on(device, a) for a in _twice(make))
    out_public = public(a1, None)
    out_raw = opdef.overload(*op_cases.schema_order(op, a2))
    assert len(ran) == 2 and ran[0] == ran[1] != "reference", ran
    assert ran[0] == ("cpu" if device == "cpu" else opdef.default_cuda(*op_cases.schema_order(op, a1)))
    if isinstance(out_raw, tuple) and not isinstance(out_public, tuple):  # (out, S, z) vs out
        out_raw = out_raw[0]
    if out_public is not None:
        torch.testing.assert_close(out_raw, out_public, equal_nan=True)


def test_default_rule_on_cuda(monkeypatch):
    """What backend=None picks for CUDA tensors, per build (checked on meta tensors, no GPU needed):
    the CUDA C++ kernel where the build has it and the shape fits it, Triton otherwise."""
    cq, dec = _registry.REGISTRY["cherryq_matmul"], _registry.REGISTRY["decode_attention"]
    qw = op_cases.OPS["cherryq_matmul"][0]()

    def cq_args(rows):
        a = dict(qw, x=torch.empty(rows, 128, device="meta"))
        return op_cases.schema_order("cherryq_matmul", a)

    def dec_args(d, b=1):
        return torch.empty(b, 4, d, device="meta"), torch.empty(b, 2, 8, d, device="meta")

    for cuda_kernels, triton in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(_ops, "has_cuda_kernels", lambda v=cuda_kernels: v)
        monkeypatch.setattr(_ops, "has_triton", lambda v=triton: v)
        want_small = "cuda" if cuda_kernels else "triton"
        assert cq.default_cuda(*cq_args(8)) == want_small
        assert cq.default_cuda(*cq_args(9)) == ("triton" if triton else "cuda")
        assert dec.default_cuda(*dec_args(256)) == want_small
        assert dec.default_cuda(*dec_args(320)) == ("triton" if triton else "cuda")
        assert dec.default_cuda(*dec_args(64, b=70000)) == ("triton" if triton else "cuda")  # grid y limit


@pytest.mark.parametrize("op", OPS)
def test_public_fast_path_only_for_plain_eager_calls(op, monkeypatch):
    """Plain eager calls skip the dispatcher; a call under a dispatch mode must not (here: the
    FakeTensorMode of torch.compile's tracing, which only the dispatcher path honours)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    opdef = _registry.REGISTRY[op]
    make, public = op_cases.OPS[op]
    a = make()
    assert _registry._plain_eager_device(opdef, op_cases.schema_order(op, a)) == torch.device("cpu")
    with FakeTensorMode() as mode:
        fa = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        assert _registry._plain_eager_device(opdef, op_cases.schema_order(op, fa)) is None
        out = public(fa, None)
    outs = () if out is None else out if isinstance(out, tuple) else (out,)
    assert all(type(t).__name__ == "FakeTensor" for t in outs)
