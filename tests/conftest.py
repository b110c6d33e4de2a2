"""Test setup: without a GPU, the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before
fastnpo.kernels is imported, so it is set here at collection time.
"""

import os
import zlib

import pytest
import torch
from helpers import HAS_CUDA, build_tiny_llama

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Module-scoped fixtures that launch processes (torchrun ranks, CLI subprocesses): every test
# that uses one is a torchrun test too. Tests that launch processes themselves carry the marker.
PROCESS_FIXTURES = {
    "resumed",  # test_resume_world_size: runs on 4, 2 and 1 ranks
    "two_rank_resumed_runs",  # test_optimizers
    "two_rank_runs",  # test_train
    "sharded_optimizer_runs",  # test_train
    "two_nodes",  # test_hybrid_sharding
    "measured_cpu",  # test_memory_plan: a measuring subprocess per case
}


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torchrun)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh inputs in every test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Mini-TOFU (20 authors, 2 questions each) and a random tiny Llama (hidden 32), built once
    for the session: the trainer's tests read it and never write into it."""
    from fastnpo.tiny import TinyModelSpec
    from fastnpo.tofu.minitofu import prepare_tiny

    root = tmp_path_factory.mktemp("tiny")
    return prepare_tiny(root, num_authors=20, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64))


@pytest.fixture
def tiny_llama():
    """The factory build_tiny_llama(vocab_size, seed=None, **LlamaConfig overrides)."""
    return build_tiny_llama


@pytest.fixture
def python_sigint():
    """SIGINT raising KeyboardInterrupt, as in a terminal, for the test: a suite started in the
    background (nohup, `&`, some CI runners) inherits SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
