"""Test setup: without a GPU, the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before
fastnpo.kernels is imported, so it is set here at collection time.
"""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton tests: CUDA tensors with compiled kernels on a GPU machine, CPU tensors under the
# interpreter elsewhere (tiny shapes: the interpreter takes ~1 ms per program iteration).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh inputs in every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
