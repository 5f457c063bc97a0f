"""Build pyfast._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

Environment: MAX_JOBS (parallel compile jobs), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"),
PYFAST_FORCE_CPU=1 (build the CPU kernels only even where CUDA is available),
PYFAST_SANITIZE=1 (CPU build only: ASan + UBSan, -O1 -g; load it with gcc's libasan/libubsan
in LD_PRELOAD, see scripts/sanitize.sh).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    # pip's default isolated build env has no torch (pyproject.toml cannot list it: the extension
    # must build against the torch the user runs). Stop at once with the command that works.
    raise SystemExit(
        "pyfast: torch is not importable here. pyfast is built against the torch you run, so it\n"
        "cannot be built in pip's isolated build environment (pip's default). Install torch first, then:\n"
        "    pip install setuptools wheel ninja\n"
        "    pip install --no-build-isolation .\n"
        "(or: bash scripts/install.sh, which does all of this)"
    ) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    ns = {}
    with open(os.path.join(ROOT, "pyfast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def sources(pattern: str) -> list[str]:
    """csrc files matching `pattern`, except csrc/emu (the tests' CPU emulation of the CUDA kernels,
    built by tests/cuda_emu.py, never part of pyfast._C)."""
    found = glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found if os.path.relpath(p, ROOT).split(os.sep)[1] != "emu")


VERSION = read_version()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
SANITIZE = os.environ.get("PYFAST_SANITIZE") == "1"
WITH_CUDA = (
    not SANITIZE
    and torch.version.cuda is not None
    and NVCC is not None
    and os.path.exists(NVCC)
    and os.environ.get("PYFAST_FORCE_CPU") != "1"
)
if torch.version.cuda is not None and not WITH_CUDA:
    print("pyfast: torch has CUDA but nvcc was not found (or PYFAST_FORCE_CPU=1 or PYFAST_SANITIZE=1): building the CPU kernels only")
ARCH_LIST = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a") if WITH_CUDA else ""

# Host sources: the schema, the pybind module and every CPU kernel. The *_cuda_host.cpp files
# hold ATen host code for CUDA kernels and are compiled only in a CUDA build.
cpp_sources = [s for s in sources("**/*.cpp") if not s.endswith("_cuda_host.cpp")]
defines = [f'-DPYFAST_VERSION="{VERSION}"', f'-DPYFAST_CUDA_ARCH_LIST="{ARCH_LIST}"']
cxx_flags = ["-O3", "-fopenmp", *defines]  # the C++ standard is the one torch asks for
link_flags = ["-fopenmp"]
if SANITIZE:
    # ASan + UBSan, any UB report fatal. These come after Python's own CFLAGS and -O3, so they
    # win: -O1 -g, and -fno-wrapv because Python's -fwrapv turns off UBSan's signed-overflow
    # check. The .so links the shared libasan/libubsan; python itself is not instrumented, so
    # they must be LD_PRELOADed.
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cxx_flags += [*san, "-fno-wrapv", "-g", "-O1"]
    link_flags += san
    print("pyfast: PYFAST_SANITIZE=1: CPU build with ASan + UBSan")
if WITH_CUDA:
    ext = CUDAExtension(
        "pyfast._C",
        cpp_sources + sources("**/*_cuda_host.cpp") + sources("**/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("PYFAST_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", *defines],
        },
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "pyfast._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

# Every package under pyfast/ (found, never listed by hand). pyfast/kernels is a link to kernels/,
# the Triton kernels, shipped inside the wheel as pyfast.kernels (package_dir names the real folder).
PACKAGES = sorted(set(find_packages(include=["pyfast", "pyfast.*"])) | {"pyfast.kernels"})

setup(
    version=VERSION,
    packages=PACKAGES,
    package_dir={"pyfast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
