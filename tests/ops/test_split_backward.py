"""The split design (impl="split", experimental): kernels/softmax_gradient.py and the design built on it.

Where Triton runs (CUDA, or CPU under the interpreter that conftest.py turns on without a GPU),
impl="split" is the Triton forward kernel plus, per vocabulary block, the softmax-gradient kernel
and two library matmuls. Everything is checked against a plain float64 formula written here, with
a low-precision result judged against plain torch in the same dtype (tests/ops/test_logprobs.py's
rule). Interpreter shapes stay tiny: the kernel test computes one narrow vocabulary block.
"""

import pytest
import torch
from helpers import TRITON_DEVICE, assert_as_good_as_torch

import fastnpo
from fastnpo.kernels.softmax_gradient import COLUMN_MULTIPLE, softmax_gradient
from fastnpo.ops.experimental import split

IGNORE = -100
DTYPES = [(torch.float32, 5e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]


def softmax_gradient_formula(logits, lse, grad, labels, v0):
    """grad * (onehot(labels == v0 + j) - exp(logits - lse)) for a block of columns v0..., in logits' dtype."""
    columns = v0 + torch.arange(logits.shape[1])
    onehot = (labels[:, None] == columns[None, :]).to(logits.dtype)
    return grad[:, None] * (onehot - (logits - lse[:, None]).exp())


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("v", [67, 1031])
@pytest.mark.parametrize("d", [16, 72])
@pytest.mark.parametrize("n", [1, 37, 130])
def test_softmax_gradient_block_matches_float64(n, d, v, dtype, tol):
    # A 100-column block in the middle of the vocabulary (ragged against any column tile), of the
    # rows picked by a shuffled row_ids subset, a third of whose targets fall inside the block.
    width = min(v, 100)
    v0 = (v - width) // 2
    hidden64 = torch.randn(n + 5, d, dtype=torch.float64) * 2
    weight64 = torch.randn(v, d, dtype=torch.float64) / d**0.5
    row_ids = torch.randperm(n + 5)[:n]
    labels = torch.randint(0, v, (n,))
    labels[::3] = v0 + torch.randint(0, width, labels[::3].shape)
    grad = torch.randn(n, dtype=torch.float64)
    logits64 = hidden64[row_ids] @ weight64.T
    lse = logits64.logsumexp(-1)  # the forward's output: exact here, so only the kernel is judged
    hidden, weight = hidden64.to(dtype), weight64.to(dtype)

    ref = softmax_gradient_formula(logits64[:, v0 : v0 + width], lse, grad, labels, v0)
    same_dtype_logits = (hidden[row_ids] @ weight[v0 : v0 + width].T).double()
    same_dtype = softmax_gradient_formula(same_dtype_logits, lse, grad, labels, v0).to(dtype)

    # Poisoned, and wider than the block: the kernel writes exactly the block's columns.
    buffer = torch.full((n, width + 3), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    out = softmax_gradient(
        hidden.to(TRITON_DEVICE),
        weight[v0 : v0 + width].to(TRITON_DEVICE),
        row_ids.to(TRITON_DEVICE),
        labels.to(TRITON_DEVICE),
        lse.float().to(TRITON_DEVICE),
        grad.float().to(TRITON_DEVICE),
        v0,
        buffer[:, :width],
    )
    assert out.dtype == dtype and out.data_ptr() == buffer.data_ptr()
    assert torch.isfinite(out).all()
    assert torch.isnan(buffer[:, width:]).all(), "wrote outside the block"
    assert_as_good_as_torch(out, same_dtype, ref, tol, "dlogits")


def token_logprobs64(hidden, weight, labels):
    """float64 log softmax(hidden @ weight.T)[labels], 0 where ignored."""
    logits = hidden.double() @ weight.double().T
    picked = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return picked.masked_fill(labels == IGNORE, 0.0)


def same_dtype_logprobs(hidden, weight, labels):
    """Plain torch with the logits in the inputs' dtype (what a model's lm_head would give)."""
    logits = (hidden @ weight.T).float()
    picked = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return picked.masked_fill(labels == IGNORE, 0.0)


def values_and_grads(fn, hidden, weight, labels, upstream):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, labels)
    (out.double() * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.fixture
def split_only(monkeypatch):
    """Fail if impl="split" falls back to its torch block loop instead of the split path."""

    def fail(*args, **kwargs):
        raise AssertionError("impl='split' took the torch block loop, not the split path")

    monkeypatch.setattr(split, "_blocked_forward", fail)
    monkeypatch.setattr(split, "_blocked_backward", fail)


@pytest.mark.usefixtures("split_only")
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("d,v", [(72, 67), (16, 263)])
@pytest.mark.parametrize("n", [1, 37, 130])
def test_split_split_path_matches_float64(n, d, v, dtype, tol, monkeypatch):
    # Vocabulary blocks one column tile wide (the last one narrow: a column slice of the buffer)
    # and, at n=130, 40-row blocks whose dW sums go through the fp32 block accumulator. One block
    # of everything (the default at these sizes) is what tests/ops/test_logprobs.py's impl="split"
    # cases run through the same interpreter.
    width = COLUMN_MULTIPLE
    monkeypatch.setattr(split, "SPLIT_BUFFER_BYTES", min(n, 40) * width * dtype.itemsize)
    monkeypatch.setattr(split, "MIN_SPLIT_COLUMNS", width)
    if v > width:
        assert split.split_blocks(n, v, dtype.itemsize, COLUMN_MULTIPLE) == (min(n, 40), width)
    hidden = (torch.randn(n, d, dtype=torch.float64) * 2).to(dtype).to(TRITON_DEVICE)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(TRITON_DEVICE)
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = IGNORE
    labels = labels.to(TRITON_DEVICE)
    upstream = torch.randn(n, dtype=torch.float64, device=TRITON_DEVICE)

    def ours_fn(h, w, y):
        return fastnpo.token_logprobs(h, w, y, impl="split", filter_eps=None)

    ours, dh, dw = values_and_grads(ours_fn, hidden, weight, labels, upstream)
    base, dh_base, dw_base = values_and_grads(same_dtype_logprobs, hidden, weight, labels, upstream)
    ref, dh_ref, dw_ref = values_and_grads(token_logprobs64, hidden.double(), weight.double(), labels, upstream)
    assert ours.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert torch.all(ours[labels == IGNORE] == 0) and torch.all(dh[labels == IGNORE] == 0)
    assert_as_good_as_torch(ours, base, ref, tol, "logprobs")
    assert_as_good_as_torch(dh, dh_base, dh_ref, tol, "d hidden")
    assert_as_good_as_torch(dw, dw_base, dw_ref, tol, "d weight")


def test_cpu_without_interpreter_keeps_the_torch_block_loop(monkeypatch):
    # No CUDA, no interpreter: the split kernels cannot run, so impl="split" is the block loop.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert split.split_kernels(torch.device("cpu")) is None
    called = []
    for name in ("_blocked_forward", "_blocked_backward"):
        real = getattr(split, name)
        monkeypatch.setattr(
            split, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k)
        )
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(41, 16, requires_grad=True)
    fastnpo.token_logprobs(hidden, weight, torch.randint(0, 41, (9,)), impl="split").sum().backward()
    assert called == ["_blocked_forward", "_blocked_backward"]


def test_split_blocks_fit_the_buffer_budget():
    for n, v, size in [(1, 7, 2), (8192, 128256, 2), (8192, 128256, 4), (200_000, 256000, 2), (3, 100, 4)]:
        rows, vocab = split.split_blocks(n, v, size, 256)
        assert 1 <= rows <= n and 1 <= vocab <= v
        assert rows * vocab * size <= split.SPLIT_BUFFER_BYTES
        assert vocab == v or vocab % 256 == 0
    # N=8192 bf16: all rows in one block, eight near-equal ~16k-column blocks (252 MiB buffer).
    assert split.split_blocks(8192, 128256, 2, 256) == (8192, 16128)
    # Rows are split only when a block would be narrower than MIN_SPLIT_COLUMNS.
    assert split.split_blocks(200_000, 256000, 2, 256)[0] == split.SPLIT_BUFFER_BYTES // 2 // 2048


@pytest.mark.gpu
@pytest.mark.usefixtures("split_only")
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_split_split_path_on_cuda_crosses_blocks(dtype, tol, monkeypatch):
    # Compiled kernels and cuBLAS matmuls: 1024-column blocks, the last one narrow, 700-row blocks.
    n, d, v = 2000, 256, 5003
    monkeypatch.setattr(split, "SPLIT_BUFFER_BYTES", 700 * 1024 * dtype.itemsize)
    monkeypatch.setattr(split, "MIN_SPLIT_COLUMNS", 1024)
    hidden = (torch.randn(n, d, dtype=torch.float64) * 2).to(dtype).cuda()
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).cuda()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = IGNORE
    upstream = torch.randn(n, dtype=torch.float64, device="cuda")
    ours, dh, dw = values_and_grads(
        lambda h, w, y: fastnpo.token_logprobs(h, w, y, impl="split", filter_eps=None),
        hidden,
        weight,
        labels,
        upstream,
    )
    base, dh_base, dw_base = values_and_grads(same_dtype_logprobs, hidden, weight, labels, upstream)
    ref, dh_ref, dw_ref = values_and_grads(token_logprobs64, hidden.double(), weight.double(), labels, upstream)
    assert_as_good_as_torch(ours, base, ref, tol, "logprobs")
    assert_as_good_as_torch(dh, dh_base, dh_ref, tol, "d hidden")
    assert_as_good_as_torch(dw, dw_base, dw_ref, tol, "d weight")
