"""token_logprobs / sequence_logprobs: every impl against a float64 reference, values and gradients."""

import pytest
import torch
from helpers import TRITON_DEVICE, assert_as_good_as_torch

import fastnpo
from fastnpo.ops.naive import naive_token_logprobs

IGNORE = -100
TOL = {torch.float32: 5e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# (N, D, V): N = 1, D not a multiple of 16, V prime.
SHAPES = [(1, 16, 17), (19, 37, 101), (64, 48, 257)]


def reference_logprobs(hidden, weight, labels, ignore_index=IGNORE):
    """float64 log softmax(hidden @ weight.T)[labels], 0 where ignored."""
    logits = hidden.double() @ weight.double().T
    ignored = labels == ignore_index
    picked = logits.log_softmax(-1).gather(-1, labels.masked_fill(ignored, 0)[..., None])[..., 0]
    return picked.masked_fill(ignored, 0.0)


def device_for(impl):
    return TRITON_DEVICE if impl == "triton" else "cpu"


def make_inputs(n, d, v, dtype, device, *, scale=1.0, ignore_fraction=0.3):
    hidden = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype).to(device)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_fraction] = IGNORE
    return hidden, weight, labels.to(device)


def grads(fn, hidden, weight, labels, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, labels)
    (out.double() * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def check_against_reference(impl, hidden, weight, labels):
    """Values and both gradients of impl vs float64, judged against torch in the same dtype."""
    upstream = torch.randn(labels.shape, dtype=torch.float64, device=hidden.device)
    ours, dh, dw = grads(
        lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl=impl, filter_eps=None),
        hidden,
        weight,
        labels,
        upstream,
    )
    naive, dh_naive, dw_naive = grads(naive_token_logprobs, hidden, weight, labels, upstream)
    ref, dh_ref, dw_ref = grads(reference_logprobs, hidden.double(), weight.double(), labels, upstream)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert torch.isfinite(ours).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    tol = TOL[hidden.dtype]
    assert_as_good_as_torch(ours, naive, ref, tol, "logprobs")
    assert_as_good_as_torch(dh, dh_naive, dh_ref, tol, "d hidden")
    assert_as_good_as_torch(dw, dw_naive, dw_ref, tol, "d weight")
    return ours, dh


@pytest.mark.parametrize("impl", ["torch", "split", "triton", "naive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,v", SHAPES)
def test_token_logprobs_values_and_gradients(impl, dtype, n, d, v):
    hidden, weight, labels = make_inputs(n, d, v, dtype, device_for(impl), scale=3.0)
    ours, dh = check_against_reference(impl, hidden, weight, labels)
    ignored = labels == IGNORE
    assert torch.all(ours[ignored] == 0.0), "ignored positions must be exactly 0"
    assert torch.all(dh[ignored] == 0), "ignored rows get no gradient"


@pytest.mark.parametrize("impl", ["torch", "split", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_do_not_overflow(impl, dtype):
    # |logit| ~ 100: exp overflows fp32 at 88 without the max subtraction.
    hidden, weight, labels = make_inputs(23, 32, 97, dtype, device_for(impl), ignore_fraction=0.0)
    hidden = (hidden.double() * 100 / (hidden.double() @ weight.double().T).abs().max()).to(dtype)
    assert (hidden.double() @ weight.double().T).abs().max() > 90
    ours, _ = check_against_reference(impl, hidden, weight, labels)
    assert ours.min() < -50, "some targets should be very unlikely at this scale"


@pytest.mark.parametrize("impl", ["torch", "split", "triton", "naive"])
def test_non_contiguous_inputs_and_leading_dims(impl):
    device = device_for(impl)
    b, t, d, v = 3, 5, 24, 53
    hidden = torch.randn(d, t, b, device=device).permute(2, 1, 0)  # [B, T, D], strides reversed
    weight = (torch.randn(d, v, device=device) / d**0.5).T  # [V, D], column-major
    labels = torch.randint(0, v, (b, 2 * t), device=device)[:, ::2]  # [B, T], stride 2
    labels[0, 1] = IGNORE
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    upstream = torch.randn(b, t, dtype=torch.float64, device=device)
    ours, dh, dw = grads(lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl=impl), hidden, weight, labels, upstream)
    ref, dh_ref, dw_ref = grads(reference_logprobs, hidden.double(), weight.double(), labels, upstream)
    assert ours.shape == (b, t)
    torch.testing.assert_close(ours.double(), ref, atol=5e-4, rtol=0)
    torch.testing.assert_close(dh.double(), dh_ref, atol=5e-4, rtol=0)
    torch.testing.assert_close(dw.double(), dw_ref, atol=5e-4, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "split", "triton"])
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_one_input_requires_grad(impl, needs):
    device = device_for(impl)
    hidden, weight, labels = make_inputs(9, 16, 41, torch.float32, device)
    hidden.requires_grad_(needs[0])
    weight.requires_grad_(needs[1])
    fastnpo.token_logprobs(hidden, weight, labels, impl=impl).sum().backward()
    assert (hidden.grad is not None) == needs[0] and (weight.grad is not None) == needs[1]


def test_all_targets_ignored_and_empty():
    hidden, weight, _ = make_inputs(6, 16, 31, torch.float32, "cpu")
    hidden.requires_grad_()
    labels = torch.full((6,), IGNORE)
    out = fastnpo.token_logprobs(hidden, weight, labels, impl="torch")
    assert torch.equal(out, torch.zeros(6))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    empty = fastnpo.token_logprobs(torch.randn(0, 16), weight, torch.zeros(0, dtype=torch.long), impl="torch")
    assert empty.shape == (0,)


def test_chunked_path_crosses_chunk_boundaries(monkeypatch):
    # Force many small row and vocabulary blocks so every boundary case of the loops runs.
    from fastnpo.ops import chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * 5)
    monkeypatch.setattr(chunked, "MIN_VOCAB_CHUNK", 5)
    hidden, weight, labels = make_inputs(23, 16, 47, torch.float32, "cpu", ignore_fraction=0.2)
    upstream = torch.randn(23, dtype=torch.float64)
    ours, dh, dw = grads(
        lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl="torch"), hidden, weight, labels, upstream
    )
    ref, dh_ref, dw_ref = grads(reference_logprobs, hidden.double(), weight.double(), labels, upstream)
    torch.testing.assert_close(ours.double(), ref, atol=5e-5, rtol=0)
    torch.testing.assert_close(dh.double(), dh_ref, atol=5e-5, rtol=0)
    torch.testing.assert_close(dw.double(), dw_ref, atol=5e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_path_crosses_block_boundaries(monkeypatch, dtype):
    # Tiny blocks: several vocabulary blocks and, with more rows than a block holds, dW summed
    # over row blocks (the fp32 block accumulator) instead of written once. The torch block loop
    # runs where Triton cannot (CPU without the interpreter); the split path has its own tests
    # (test_split_backward.py).
    from fastnpo.ops.experimental import split

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(split, "BLOCK_BYTES", 4 * 7 * 5)
    monkeypatch.setattr(split, "MIN_VOCAB_BLOCK", 5)
    assert split.blocks(23, 47, split.BLOCK_BYTES) == (7, 5)
    hidden, weight, labels = make_inputs(23, 16, 47, dtype, "cpu", ignore_fraction=0.2)
    _, dh = check_against_reference("split", hidden, weight, labels)
    assert torch.all(dh[labels == IGNORE] == 0)


def test_split_blocks_fit_the_byte_budget():
    from fastnpo.ops.experimental.split import BLOCK_BYTES, MIN_VOCAB_BLOCK, blocks

    for n, v in [(1, 7), (8192, 128256), (65536, 256000), (3, 100), (100_000, 300)]:
        rows, vocab = blocks(n, v)
        assert 1 <= rows <= n and 1 <= vocab <= v
        assert rows * vocab * 4 <= max(BLOCK_BYTES, MIN_VOCAB_BLOCK * 4) or rows == 1
        assert vocab >= min(v, MIN_VOCAB_BLOCK)
    assert blocks(8192, 128256) == (8192, 1024)  # N=8192: every row in one block, so dW is written once


def test_split_matmul_mode_on_cpu_is_upcast():
    from fastnpo.ops.matmuls import matmul_mode

    assert matmul_mode("cpu", torch.bfloat16) == "upcast"
    assert matmul_mode("cpu", torch.float32) == "upcast"


@pytest.mark.parametrize("impl", ["torch", "split", "triton", "naive"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("shift", [True, False])
def test_sequence_logprobs(impl, average, shift):
    device = device_for(impl)
    b, t, d, v = 4, 7, 20, 59
    hidden = torch.randn(b, t, d, device=device)
    weight = torch.randn(v, d, device=device) / d**0.5
    labels = torch.randint(0, v, (b, t), device=device)
    labels[:, :3] = IGNORE  # prompt
    labels[1, 5:] = IGNORE  # padding
    labels[2] = IGNORE  # a row with no target at all
    hidden.requires_grad_()
    ours = fastnpo.sequence_logprobs(hidden, weight, labels, shift=shift, average=average, impl=impl)

    h = hidden.detach().double().requires_grad_()
    targets = torch.cat([labels[:, 1:], torch.full((b, 1), IGNORE, device=device)], 1) if shift else labels
    tokens = reference_logprobs(h, weight.double(), targets)
    counts = (targets != IGNORE).sum(1)
    ref = tokens.sum(1) / (counts.clamp(min=1) if average else 1)
    assert ours.shape == (b,) and ours.dtype == torch.float32
    assert ours[2] == 0.0
    torch.testing.assert_close(ours.double(), ref, atol=5e-4, rtol=0)
    upstream = torch.randn(b, dtype=torch.float64, device=device)
    (ours.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h.grad, atol=5e-4, rtol=0)
