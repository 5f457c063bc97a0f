import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where there is no GPU. Must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyfast  # noqa: E402
from pyfast.testing import poisoned_outputs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = pyfast.build_info()["triton"]


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
