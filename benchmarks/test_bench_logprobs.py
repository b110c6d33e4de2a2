"""pytest-benchmark suite at tiny CPU sizes: fastnpo impl="naive" vs impl="torch", forward and fwd+bwd,
and the NPO loss's designs (npo_loss design="two_call" / "two_sweep" / "one_pass", bench_logprobs' npo-*
contenders).

Not part of the main test run (pyproject's testpaths is ["tests"]); run it explicitly:

    .venv/bin/python -m pytest benchmarks/test_bench_logprobs.py --benchmark-columns=min,median,max,rounds

Each case checks its values (and gradients) against the naive implementation before timing.
"""

import pytest
import torch
from bench_logprobs import Contender, make_npo_fn, npo_labels  # benchmarks/ is on sys.path in pytest
from common import make_inputs

import fastnpo

pytest.importorskip("pytest_benchmark")

N, D, V = 256, 64, 8192
NPO_T = 64  # four sequences


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


@pytest.mark.parametrize("design", ["two_call", "two_sweep", "one_pass"])
def test_npo_forward_backward(benchmark, inputs, design):
    # The npo-unfused / npo-fused / npo-one-pass contenders' path, against npo-naive.
    hidden, weight, labels, _ = inputs
    labels = npo_labels(labels, NPO_T)
    ref_logps = torch.randn(N // NPO_T, generator=torch.Generator().manual_seed(2)) - 100

    def run(contender):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        loss = make_npo_fn(contender, NPO_T, ref_logps)(h, w, labels)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    expected = run(Contender("npo-naive", None, kind="npo", impl="naive"))
    contender = Contender("npo", None, kind="npo", impl="torch", design=design)
    got = benchmark.pedantic(run, args=(contender,), rounds=5, warmup_rounds=1)
    for mine, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
