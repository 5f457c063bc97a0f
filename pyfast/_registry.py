"""The op registry: every torch.ops.pyfast.* op is declared here once, by an `OpDef`.

An OpDef holds everything about one op: its schema, its rules (`check`: shapes, dtypes and
scalar values, from metadata only; `check_data`: rules that read tensor data), its fake impl, its
autograd (if it trains), its implementations per backend ("cpu", "cuda", "triton", "reference")
and the rule that picks the default on CUDA. `define(opdef)` turns it into `torch.ops.pyfast.<name>`:

    pyfast.<op>(..., backend=None)      public function: `opdef.call(*args, backend=backend)`
      -> torch.ops.pyfast.<op>(..., backend=None)      one schema, one dispatcher entry
           Autograd key: the registered backward (if any)
           CPU / CUDA keys: `OpDef.run`: rules, then the chosen implementation
           Meta / fake tensors: rules (metadata only), then `fake`

So every entry point (the public function, the raw op on CPU or CUDA, each backend, torch.compile
tracing) enforces the same rules with the same messages. Rules every op gets from the registry
without declaring them (docs/design.md § Rules):
  - arguments bind to the schema (the public function raises TypeError naming the argument; the
    raw op leaves that to torch's own argument parser),
  - every tensor argument is on one device,
  - a tensor the op writes (`Tensor(a!)` in the schema) has no internally overlapping elements
    and shares no memory with any other tensor argument,
  - an op without a backward refuses inputs that require grad while grad mode is on (a silent
    missing gradient is a wrong result).
Error convention: TypeError for a wrong type or dtype, ValueError for a wrong shape or value; the
message reads `pyfast.<op>: expected <what>, got <what>` and names the argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from pyfast import _ops
from pyfast._validate import fail, fail_type

BACKENDS = ("cpu", "cuda", "triton", "reference")

_LIB = torch.library.Library("pyfast", "DEF")
REGISTRY: dict[str, "OpDef"] = {}


@dataclasses.dataclass(frozen=True)
class Autograd:
    """backward(ctx, *grads) -> one gradient per schema argument (None for non-tensors);
    setup_context(ctx, inputs, output) with `inputs` the positional schema arguments."""

    backward: Callable
    setup_context: Callable


@dataclasses.dataclass
class OpDef:
    name: str
    schema: str  # "(Tensor x, ...) -> Tensor", without the name and without `backend`
    check: Callable[..., None]  # check(*args): metadata-only rules; raises TypeError/ValueError
    fake: Callable[..., Any]  # fake(*args): outputs from shapes (the rules have run)
    impls: Mapping[str, Callable[..., Any]]  # backend -> implementation(*args)
    default_cuda: Callable[..., str] = lambda *args: "cuda"  # backend=None on CUDA tensors
    check_data: Callable[..., None] | None = None  # rules that read tensor data (see _data_checks_allowed)
    autograd: Autograd | None = None
    differentiable: tuple[str, ...] = ()  # arguments the backward gives gradients for

    # Derived from the schema by `define`.
    arg_names: tuple[str, ...] = ()
    arg_kinds: tuple[str, ...] = ()  # "Tensor", "Tensor?", "int", "float", "float?", "bool", "str", ...
    tensor_args: tuple[int, ...] = ()  # positions of the Tensor / Tensor? arguments
    scalar_binds: tuple[tuple[int, type | None], ...] = ()  # the others: (position, Python type binding as is)
    written: tuple[int, ...] = ()  # positions of the tensors the op writes in place
    overload: Any = None  # torch.ops.pyfast.<name>.default, set by `define`

    def call(self, *args, backend: str | None = None):
        """The public functions' entry: bind the arguments to the schema (TypeError naming the one
        that does not fit), then run the op. Plain eager calls (plain CPU/CUDA tensors, no
        torch.compile, no dispatch or function mode, no gradient to record) go straight to `_run`,
        what the dispatcher would reach for them through `run`, which saves the dispatcher's boxing of
        every argument (decode loops make many small calls); everything else goes through
        torch.ops.pyfast.<name>."""
        if backend is not None and type(backend) is not str:
            fail_type(self.name, "backend", f"None or one of {tuple(self.impls)}", f"{type(backend).__name__} {backend!r}")
        device = _plain_eager_device(self, args)
        if device is not None:  # every tensor argument is a plain tensor on `device`: bind the rest
            for i, plain in self.scalar_binds:
                v = args[i]
                if type(v) is not plain or (plain is int and not _INT64[0] <= v <= _INT64[1]):
                    _check_binds(self.name, self.arg_names[i], self.arg_kinds[i], v)  # None, or an error
            return self._run(args, backend, device)
        for name, kind, value in zip(self.arg_names, self.arg_kinds, args):
            _check_binds(self.name, name, kind, value)
        return self.overload(*args, backend=backend)

    def run(self, *args, backend: str | None = None):
        """The CPU and CUDA dispatch keys' kernel: the rules, then the chosen implementation."""
        device = _check_device(self, args)
        _check_grad(self, args)
        return self._run(args, backend, device)

    def _run(self, args, backend, device):
        """The rules (every tensor is known to be on `device`, and no input requires grad where
        that is refused), then the chosen implementation."""
        self.check(*args)
        if self.written:
            _check_written(self, args)
        if self.check_data is not None and (device is _CPU or _data_checks_allowed(device)):
            self.check_data(*args)
        if backend is None and device is _CPU:
            return self.impls["cpu"](*args)
        return self.impls[resolve_backend(self, backend, device, args)](*args)


def _plain_eager_device(opdef: OpDef, args) -> torch.device | None:
    """The device of a call the dispatcher would send straight to `OpDef.run` (plain CPU or CUDA
    tensors, all on one device, eager mode, no input that requires grad while grad mode is on:
    autograd to record, or a refusal to report); None otherwise."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return None
    grad = torch.is_grad_enabled()
    cpu = True
    for i in opdef.tensor_args:
        t = args[i]
        if t is None and opdef.arg_kinds[i] == "Tensor?":
            continue
        if type(t) is not torch.Tensor or t.layout is not _STRIDED or (grad and t.requires_grad):
            return None
        if not t.is_cpu:
            cpu = False
    if cpu:
        return _CPU
    try:
        return _check_device(opdef, args) if args[opdef.tensor_args[0]].is_cuda else None
    except ValueError:
        return None  # mixed devices: the dispatcher path reports it


# ---------------------------------------------------------------------------------------------
# Schema binding (the public functions' type checks, derived from the schema)
# ---------------------------------------------------------------------------------------------
_INT64 = (-(2**63), 2**63 - 1)
_FLOAT_MAX = 1.7976931348623157e308
_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool}  # values that bind as they are


def _check_binds(op: str, name: str, kind: str, value) -> None:
    optional = kind.endswith("?")
    if value is None:
        if not optional:
            fail_type(op, name, f"a {kind}", "None")
        return
    base = kind.rstrip("?")
    if base == "Tensor":
        if not isinstance(value, torch.Tensor):
            fail_type(op, name, "a torch.Tensor", type(value).__name__)
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail_type(op, name, "an int", f"{type(value).__name__} {value!r}")
        if not _INT64[0] <= value <= _INT64[1]:
            fail(op, name, "an int in the int64 range", repr(value))
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail_type(op, name, "a float", f"{type(value).__name__} {value!r}")
        if isinstance(value, int) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
            fail(op, name, "a float in the float64 range", "an int too large for one")
    elif base == "str":
        if not isinstance(value, str):
            fail_type(op, name, "a str", f"{type(value).__name__} {value!r}")


def _parse(opdef: OpDef) -> None:
    schema = torch._C.parse_schema(f"pyfast::{opdef.name}{opdef.schema}")
    kinds = []
    for a in schema.arguments:
        t = str(a.type)
        kinds.append(t[len("Optional[") : -1] + "?" if t.startswith("Optional[") else t)
    opdef.arg_names = tuple(a.name for a in schema.arguments)
    opdef.arg_kinds = tuple(kinds)
    opdef.tensor_args = tuple(i for i, k in enumerate(kinds) if k.startswith("Tensor"))
    opdef.scalar_binds = tuple((i, _PLAIN_TYPES.get(k.rstrip("?"))) for i, k in enumerate(kinds)
                               if not k.startswith("Tensor"))
    opdef.written = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


# ---------------------------------------------------------------------------------------------
# Rules every op gets
# ---------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")
_STRIDED = torch.strided


def _check_device(opdef: OpDef, args) -> torch.device:
    """Strided tensors (no sparse or mkldnn layouts), all on one device (a meta tensor among CPU
    ones is an error). Returns the device."""
    cpu = True
    for i in opdef.tensor_args:
        t = args[i]
        if t is None:
            continue
        if t.layout is not _STRIDED:
            fail_type(opdef.name, opdef.arg_names[i], "a strided (dense) tensor", f"layout {t.layout}")
        cpu = cpu and t.is_cpu
    if cpu:  # the common case (decode loops): no torch.device objects built
        return _CPU
    first = opdef.tensor_args[0]
    device = args[first].device
    for i in opdef.tensor_args:
        t = args[i]
        if t is not None and t.device != device:
            fail(opdef.name, opdef.arg_names[i], f"on {device} (the device of {opdef.arg_names[first]})", t.device)
    return device


def _check_grad(opdef: OpDef, args) -> None:
    """While grad mode is on, an input that requires grad must be one the op's backward
    differentiates (none for an op without backward): a gradient must never silently go missing,
    and an in-place op must not write into a tensor autograd tracks."""
    if torch.is_grad_enabled():
        _refuse_grad(opdef, args)


def _refuse_grad(opdef: OpDef, args) -> None:
    """Raise for an input that requires grad and is not one the backward differentiates."""
    for i in opdef.tensor_args:
        t = args[i]
        if t is not None and t.requires_grad and opdef.arg_names[i] not in opdef.differentiable:
            what = ("differentiable in " + ", ".join(opdef.differentiable) if opdef.differentiable
                    else "without a backward")
            fail(opdef.name, opdef.arg_names[i], f"not to require grad (pyfast.{opdef.name} is {what}: call it "
                 "under torch.no_grad() or pass a detached tensor)", "requires_grad=True")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte address of a non-empty tensor (torch strides are never negative)."""
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _may_self_overlap(t: torch.Tensor) -> bool:
    """False when the strides prove every element has its own address: taken from the smallest
    stride up, each dim's stride must step past everything the smaller dims span. (True for
    expand() views, and for as_strided layouts whose rows interleave.)"""
    span = 0  # elements spanned by the dims seen so far, minus one
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda d: d[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _check_written(opdef: OpDef, args) -> None:
    """A written tensor has no overlapping elements and shares no memory with any other tensor
    argument: address ranges compared whatever storage they come from (two from_numpy views of
    one array are distinct storages), a conservative test like ATen's."""
    # Every tensor argument's byte range, once per call (ops write up to 4 of their tensors).
    ranges = {j: _byte_range(args[j]) for j in opdef.tensor_args if args[j] is not None and args[j].numel() > 0}
    for i in opdef.written:
        name, t = opdef.arg_names[i], args[i]
        if t.numel() == 0:
            continue
        if _may_self_overlap(t):
            fail(opdef.name, name, "without overlapping elements (it is written in place)",
                 f"shape {list(t.shape)} with strides {list(t.stride())}")
        lo, hi = ranges[i]
        for j, (olo, ohi) in ranges.items():
            if j != i and lo < ohi and olo < hi:
                fail(opdef.name, name, f"not to share memory with {opdef.arg_names[j]} (it is written in place)",
                     "overlapping tensors")


def _data_checks_allowed(device: torch.device) -> bool:
    """Rules that read tensor data run in eager mode; while a CUDA graph is being captured they
    cannot (no host sync), and the kernels then clamp what they read and write instead."""
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------
def _triton_runs_on(device: torch.device) -> bool:
    if not _ops.has_triton():
        return False
    if device.type == "cuda":
        return True
    from pyfast.kernels._utils import INTERPRETED  # CPU tensors run in the Triton interpreter only

    return device.type == "cpu" and INTERPRETED


def resolve_backend(opdef: OpDef, backend: str | None, device: torch.device, args) -> str:
    """The implementation that runs: `backend`, or (None) the default: C++ on CPU,
    `default_cuda(*args)` on CUDA; either way checked against the tensors' device and this build."""
    op = opdef.name
    if backend is None:
        if device.type == "cpu":
            return "cpu"
        if device.type != "cuda":
            fail(op, "tensors", "on a CPU or CUDA device", device)
        backend = opdef.default_cuda(*args)
    elif backend not in opdef.impls:
        fail(op, "backend", f"one of {(None, *opdef.impls)}", repr(backend))
    if backend == "cpu" and device.type != "cpu":
        fail(op, "tensors", "on the CPU for backend='cpu'", device)
    if backend == "cuda":
        if device.type != "cuda" and not (device.type == "cpu" and _ops.cuda_emulated()):
            fail(op, "tensors", "on a CUDA device for backend='cuda'", device)
        if not _ops.has_cuda_kernels():
            fail(op, "backend", "'cuda' only in a build with the CUDA kernels (rebuild with nvcc present)",
                 "a CPU-only build")
    if backend == "triton" and not _triton_runs_on(device):
        need = "triton installed" if not _ops.has_triton() else "CUDA tensors (CPU tensors need TRITON_INTERPRET=1)"
        fail(op, "backend", f"'triton' only with {need}", f"tensors on {device}")
    return backend


def kernel_backends(opdef: OpDef, device: str | torch.device, *, interpreter: bool = False) -> list[str]:
    """The kernel implementations (every backend but the reference) of `opdef` that run on
    `device` in this build, default first; the Triton interpreter counts only with `interpreter`.
    The per-op tests and the bench runner take their backends from here."""
    device = torch.device(device)
    found = []
    for backend in opdef.impls:
        if backend == "reference" or (backend == "triton" and device.type == "cpu" and not interpreter):
            continue
        try:
            resolve_backend(opdef, backend, device, ())
        except ValueError:
            continue
        found.append(backend)
    return found


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def _with_backend(schema: str) -> str:
    args, ret = schema.rsplit("->", 1)
    args = args.strip()[1:-1].strip()
    sep = ", " if args else ""
    kw = "" if "*" in [a.strip() for a in args.split(",")] else "*, "
    return f"({args}{sep}{kw}str? backend=None) -> {ret.strip()}"


def define(opdef: OpDef) -> OpDef:
    """Declare `opdef` as torch.ops.pyfast.<name> with its rules, fake, autograd and backends."""
    assert opdef.name not in REGISTRY, opdef.name
    assert set(opdef.impls) <= set(BACKENDS), opdef.impls
    _parse(opdef)
    _LIB.define(opdef.name + _with_backend(opdef.schema))

    def fake(*args, backend=None):
        _check_device(opdef, args)
        _check_grad(opdef, args)
        opdef.check(*args)
        return opdef.fake(*args)

    # Sparse and mkldnn tensors dispatch to keys of their own: the same entry, whose layout rule
    # then names the argument (instead of torch's "no kernel for SparseCPU").
    for key in ("CPU", "CUDA", "SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA", "MkldnnCPU"):
        _LIB.impl(opdef.name, opdef.run, key)
    torch.library.register_fake(f"pyfast::{opdef.name}", fake, lib=_LIB)
    if opdef.autograd is not None:
        ag = opdef.autograd

        def setup_context(ctx, inputs, keyword_only_inputs, output):
            # The autograd path (grad mode on, an input requires grad): the forward ran below
            # autograd with grad mode off, so the grad rule is enforced here.
            _refuse_grad(opdef, inputs)
            ctx.backend = keyword_only_inputs.get("backend")  # a backward op runs on the same backend
            ag.setup_context(ctx, inputs, output)

        def backward(ctx, *grads):
            return ag.backward(ctx, *grads)

        torch.library.register_autograd(f"pyfast::{opdef.name}", backward, setup_context=setup_context, lib=_LIB)
    opdef.overload = getattr(torch.ops.pyfast, opdef.name).default
    REGISTRY[opdef.name] = opdef
    return opdef
