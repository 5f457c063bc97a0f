import os
import zlib

import pytest
import torch

# The one place that sets up the Triton interpreter: Triton kernels run on the CPU through it
# where there is no GPU. Must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyfast  # noqa: E402
from pyfast import _ops  # noqa: E402
from pyfast._registry import REGISTRY  # noqa: E402
from pyfast.testing import REL_TOL, poisoned_outputs, rel_tol  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = pyfast.build_info()["triton"]
HAS_CUDA_KERNELS = bool(pyfast.build_info()["cuda"])
TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

# The backends whose results the op tests compare with the float64 reference, in this order
# ("reference" against itself is pointless: tests/*/test_*_reference.py check the spec itself).
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


# Test ids: dtypes by short name, and a case tuple as one id (every family's case builder uses them).
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def shape_id(case) -> str:
    """A short test id for a tuple of ints, lists and dtypes."""
    parts = []
    for x in case:
        if isinstance(x, torch.dtype):
            parts.append(DTYPE_IDS[x])
        elif isinstance(x, (list, tuple)):
            parts.append("L" + "_".join(map(str, x)))
        elif x is not None:
            parts.append(str(x))
    return "-".join(parts)


# True while a test runs the CUDA kernels under the CPU emulation (its `backend` param has the id
# "cuda_emu", value "cuda"): see tests/cuda_emu.py and the _cuda_emulation fixture below.
EMULATING = [False]


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live: CUDA for "cuda" (the CPU while it is emulated), and for
    "triton" unless it runs in the interpreter (CPU tensors); the CPU for "cpu" and "reference"."""
    if backend == "cuda" and EMULATING[0]:
        return torch.device("cpu")
    if backend == "cuda" or backend == "triton" and not TRITON_INTERPRETED:
        return torch.device("cuda")
    return torch.device("cpu")


def tol(dtype: torch.dtype, backend: str) -> float:
    """The relative tolerance of docs/design.md § Testing for `backend`'s results: fp32 3e-4 on
    CUDA and in Triton on a GPU (tf32 dots), 1e-5 on the CPU and in the Triton interpreter (it
    computes fp32 dots exactly); fp16/bf16 1e-2."""
    if backend == "triton" and TRITON_INTERPRETED:
        return REL_TOL[dtype]
    return rel_tol(dtype, device_for(backend), backend=backend)


def backend_marks(backend: str) -> list:
    if backend == "cuda":  # `cuda` is skipped without a device (below); the build may lack the kernels
        return [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a build with the CUDA kernels")]
    if backend == "triton":
        return [pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]
    return []


def backends(op: str, only=None, *, emulated: bool = True) -> list:
    """pytest params for `backend`: the kernel backends of `op` (REGISTRY[op].impls), restricted to
    `only` if given; "triton" skipped where triton is not installed, "cuda" marked `cuda`. A "cuda"
    backend comes twice: on the GPU (id "cuda") and under the CPU emulation (id "cuda_emu", marked
    `cuda_emu`, run everywhere) unless `emulated` is False (tests of what only a GPU has, e.g. CUDA graphs)."""
    impls = REGISTRY[op].impls
    params = []
    for b in KERNEL_BACKENDS:
        if b in impls and (only is None or b in only):
            params.append(pytest.param(b, id=b, marks=backend_marks(b)))
            if b == "cuda" and emulated:
                params.append(pytest.param(b, id="cuda_emu", marks=[pytest.mark.cuda_emu]))
    return params


def per_backend(op: str, cases: dict, ids=str) -> list:
    """pytest params for (`backend`, `case`): each backend with its own case list (`cases[backend]`),
    so the slow Triton interpreter gets small shapes and the CPU and CUDA kernels bigger ones (the
    emulated CUDA kernels run the CUDA cases)."""
    return [pytest.param(b.values[0], case, id=f"{b.id}-{ids(case)}", marks=b.marks)
            for b in backends(op, only=cases) for case in cases[b.values[0]]]


@pytest.fixture(scope="session")
def cuda_emu_module():
    """The CUDA entry points built for the CPU emulation (tests/cuda_emu.py; built on first use)."""
    import cuda_emu

    return cuda_emu.load()


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Tests marked `cuda_emu` run backend="cuda" on CPU tensors through the emulated kernels.
    Two bits of a hash of the test's name vary the emulated device: threads run last to first
    (so a missing barrier shows whichever side of it runs first), and the device reports 1 SM
    instead of 132 (so split-K launches both with and without the merge)."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    module = request.getfixturevalue("cuda_emu_module")
    previous = _ops.emulate_cuda(module)
    h = zlib.crc32(request.node.nodeid.encode())
    module.configure(1 if h & 2 else 132, h & 1 == 1)
    EMULATING[0] = True
    try:
        yield
    finally:
        _ops.emulate_cuda(previous)
        module.configure(132, False)
        EMULATING[0] = False


@pytest.fixture(autouse=True)
def _poison_and_seed():
    torch.manual_seed(0)
    with poisoned_outputs():
        yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def pytest_configure(config):
    """PYFAST_RECORD_TRITON_CALLS=FILE: record every Triton launcher call of this run in FILE for
    `python bench/triton_aot.py --calls FILE` (.ci/run: the AOT compile then reuses this run's calls
    rather than running the Triton tests again in the interpreter)."""
    path = os.environ.pop("PYFAST_RECORD_TRITON_CALLS", None)  # popped: not for the tests' subprocesses
    if not path or not TRITON_INTERPRETED:
        return
    import importlib.util
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "triton_aot.py")
    spec = importlib.util.spec_from_file_location("pyfast_bench_triton_aot", script)
    aot = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = aot  # (its dataclasses look their module up there)
    spec.loader.exec_module(aot)
    config.pluginmanager.register(aot.CallRecorder(path), "pyfast-triton-call-recorder")
