"""pytest-benchmark suite at tiny CPU sizes: fastnpo impl="naive" vs impl="torch", forward and fwd+bwd.

Not part of the main test run (pyproject's testpaths is ["tests"]); run it explicitly:

    .venv/bin/python -m pytest benchmarks/test_bench_logprobs.py --benchmark-columns=min,median,max,rounds

Each case checks its values (and gradients) against the naive implementation before timing.
"""

import pytest
import torch
from bench_logprobs import make_inputs  # benchmarks/ is on sys.path when pytest collects this file

import fastnpo

pytest.importorskip("pytest_benchmark")

N, D, V = 256, 64, 8192


@pytest.fixture(scope="module")
def inputs():
    hidden, weight, labels = make_inputs(N, D, V, torch.float32, torch.device("cpu"), "realistic", seed=0)
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5
    return hidden, weight, labels, upstream


def _forward(hidden, weight, labels, impl):
    with torch.no_grad():
        return fastnpo.token_logprobs(hidden, weight, labels, impl=impl)


def _forward_backward(hidden, weight, labels, upstream, impl):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logps = fastnpo.token_logprobs(h, w, labels, impl=impl)
    logps.backward(upstream)
    return logps.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_forward(benchmark, inputs, impl):
    hidden, weight, labels, _ = inputs
    expected = _forward(hidden, weight, labels, "naive")
    got = benchmark.pedantic(_forward, args=(hidden, weight, labels, impl), rounds=5, warmup_rounds=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_forward_backward(benchmark, inputs, impl):
    hidden, weight, labels, upstream = inputs
    expected = _forward_backward(hidden, weight, labels, upstream, "naive")
    got = benchmark.pedantic(
        _forward_backward, args=(hidden, weight, labels, upstream, impl), rounds=5, warmup_rounds=1
    )
    for mine, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
