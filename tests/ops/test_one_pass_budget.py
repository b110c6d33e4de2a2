"""The one-pass design's per-call budget (fastnpo/ops/one_pass.py, "v2"), counted on CPU.

One call of one_pass_sequence_loss is recorded at the ATen level (TorchDispatchMode): host syncs
(ops that need a device value on the host: _local_scalar_dense, nonzero, bincount, ...) and
.tolist() calls, fills of the [V, D] / [N, D] gradients, the dW read-modify-writes, the launches
per chunk, and the matmul FLOPs: 6 n D V with n kept rows. The closure
here is separable and sync-free (torch ops only); npo_loss's own closure re-validates ref_logps on
every call (fastnpo/losses.py), which is the caller's sync, not the loop's.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import SYNCING_OPS
from torch.utils._python_dispatch import TorchDispatchMode

from fastnpo.ops import fused_sequence_loss, one_pass

IGNORE = -100
aten = torch.ops.aten

FILLS = {aten.zero_, aten.fill_, aten.zeros, aten.zeros_like, aten.new_zeros, aten.full, aten.full_like, aten.new_full}
VIEWS_AND_METADATA = {
    aten.t,
    aten.permute,
    aten.view,
    aten.slice,
    aten.select,
    aten.unsqueeze,
    aten.expand,
    aten.detach,
    aten.alias,
}


class Recorder(TorchDispatchMode):
    """(op packet, output shapes, output data pointers) of every ATen op; with poison=True every
    floating aten.empty result is filled with NaN first (a read before a write shows)."""

    def __init__(self, poison=False):
        super().__init__()
        self.ops, self.poison = [], poison

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        if self.poison and func.overloadpacket is aten.empty and out.is_floating_point():
            out.fill_(float("nan"))
        self.ops.append((func.overloadpacket, [tuple(t.shape) for t in tensors], [t.data_ptr() for t in tensors]))
        return out


def make_inputs(b, t, d, v, dtype, drop_prefix=True):
    """hidden [b t, d], weight [v, d], and the kept rows as autograd.fused_sequence_loss passes them:
    a prompt prefix of ignored rows in every sequence."""
    hidden = (torch.randn(b * t, d, dtype=torch.float64) * 2).to(dtype)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype)
    labels = torch.randint(0, v, (b, t))
    if drop_prefix:
        for row in range(b):
            labels[row, : int(torch.randint(1, t - 1, ()))] = IGNORE
    labels = labels.reshape(-1)
    row_ids = (labels != IGNORE).nonzero()[:, 0]
    return hidden, weight, labels, row_ids


def separable_loss(b):
    ref, weights = torch.randn(b) - 20, torch.rand(b) + 0.5
    return lambda logps: (weights * F.softplus(0.3 * (logps - ref))).mean() / 0.15


def ce_u_loss(b, n):
    """A token-level closure over CE-U's per-token values (a forget mean) plus a retain-like NLL."""
    per_example, per_row = torch.randn(b), torch.rand(n) / n
    return lambda logps, values: -(per_example * logps).sum() / 40 + (per_row * values).sum()


def record_call(b, t, d, v, dtype, chunk_bytes, compute_dh=True, compute_dw=True, poison=False, ce_u=False):
    hidden, weight, labels, row_ids = make_inputs(b, t, d, v, dtype)
    loss_fn = ce_u_loss(b, row_ids.numel()) if ce_u else separable_loss(b)
    per_token = dict(token_level=True, token_values="ce_u") if ce_u else {}
    args = (hidden, weight, row_ids, labels[row_ids].contiguous(), row_ids // t, b, loss_fn)
    tolist_calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        tolist_calls.append(self.numel())
        return real_tolist(self)

    torch.Tensor.tolist = counting_tolist
    try:
        with Recorder(poison) as recorder:
            loss, dh, dw = one_pass.one_pass_sequence_loss(
                *args, compute_dh=compute_dh, compute_dw=compute_dw, chunk_bytes=chunk_bytes, **per_token
            )
    finally:
        torch.Tensor.tolist = real_tolist
    chunks = len(one_pass.chunk_rows(row_ids // t, b, v, chunk_bytes)) - 1
    return dict(
        ops=recorder.ops,
        tolist=tolist_calls,
        chunks=chunks,
        out=(loss, dh, dw),
        inputs=(hidden, weight, labels),
        loss_fn=loss_fn,
    )


@pytest.mark.parametrize("ce_u", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_in_the_chunk_loop(dtype, ce_u):
    # One .tolist() (the chunk boundaries, before the loop) and no syncing op, at one chunk or many:
    # nothing in the loop waits for the device. ce_u: CE-U's per-token values (token_values="ce_u").
    b, t, d, v = 6, 9, 24, 97
    for chunk_bytes in (2**30, 1):
        call = record_call(b, t, d, v, dtype, chunk_bytes, ce_u=ce_u)
        syncs = [op for op, _, _ in call["ops"] if op in SYNCING_OPS]
        assert syncs == [], f"host syncs in one call ({call['chunks']} chunks): {syncs}"
        assert len(call["tolist"]) == 1, call["tolist"]
    assert call["chunks"] == b  # chunk_bytes=1: one sequence per chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_written_not_zero_filled(dtype):
    # dW: the first chunk writes it (mm into it), the others add: chunks - 1 read-modify-writes and
    # no fill. dH: no fill of [N, D]; only the dropped rows are zeroed (index_fill_).
    b, t, d, v = 5, 8, 24, 89
    call = record_call(b, t, d, v, dtype, chunk_bytes=1)
    _, dh, dw = call["out"]
    big = {tuple(dw.shape), tuple(dh.shape)}
    fills = [(op, shapes) for op, shapes, _ in call["ops"] if op in FILLS and big & set(shapes)]
    assert fills == [], fills
    onto_dw = [op for op, _, ptrs in call["ops"] if dw.data_ptr() in ptrs]
    writes = [op for op in onto_dw if op in (aten.mm, aten.copy_)]
    updates = [op for op in onto_dw if op in (aten.addmm_, aten.add_, aten.addmm)]
    assert len(writes) == 1 and len(updates) == call["chunks"] - 1, onto_dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_float64_with_poisoned_buffers(dtype):
    # Every new buffer NaN-poisoned: dH's kept rows and dW must be written before any read, and
    # the dropped rows exactly 0. V prime, D not a multiple of 16, one sequence per chunk.
    b, t, d, v = 4, 7, 20, 61
    call = record_call(b, t, d, v, dtype, chunk_bytes=1, poison=True)
    loss, dh, dw = call["out"]
    hidden, weight, labels = call["inputs"]
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = (h @ w.T).log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    want = call["loss_fn"](logp.masked_fill(labels == IGNORE, 0).view(b, t).sum(1))
    want.backward()
    tol = 5e-4 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert torch.all(dh[labels == IGNORE] == 0)
    for got, ref in ((loss, want), (dh, h.grad), (dw, w.grad)):
        assert (got.double() - ref.detach()).abs().max() <= tol * max(1.0, ref.abs().max().item())


MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.matmul}


class MatmulFlops(TorchDispatchMode):
    """2 M K N per matrix product, in-place and out= variants included (FlopCounterMode skips addmm_)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS:
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ce_u", [False, True])
@pytest.mark.parametrize(
    "compute_dh,compute_dw,factor", [(True, True, 6), (False, True, 4), (True, False, 4), (False, False, 2)]
)
def test_matmul_flops_are_the_floor(compute_dh, compute_dw, factor, ce_u):
    # 2 n D V for the logits, 2 n D V per gradient: 6 n D V in all, no recompute, whatever the chunking.
    # CE-U's per-token values (ce_u) cost row reductions only, no matmul.
    b, t, d, v = 5, 8, 24, 89
    hidden, weight, labels, row_ids = make_inputs(b, t, d, v, torch.float32)
    n = row_ids.numel()
    per_token = dict(token_level=True, token_values="ce_u") if ce_u else {}
    with MatmulFlops() as counter:
        one_pass.one_pass_sequence_loss(
            hidden,
            weight,
            row_ids,
            labels[row_ids],
            row_ids // t,
            b,
            ce_u_loss(b, n) if ce_u else separable_loss(b),
            compute_dh=compute_dh,
            compute_dw=compute_dw,
            chunk_bytes=1,
            **per_token,
        )
    assert counter.flops == factor * n * d * v


@pytest.mark.parametrize("ce_u,most_per_chunk", [(False, 36), (True, 52)])
def test_launches_per_chunk(ce_u, most_per_chunk):
    # Non-view ops per call: a fixed setup plus a constant per chunk, the closure's gradient included.
    # Measured (fp32, the torch-op epilogue): 15 fixed + 33 per chunk, 14 of them the closure's
    # forward and backward; no op per row or per sequence. CE-U's token-level closure and its two
    # more row statistics (the label-excluded max, sums, xlogy per column block): 18 + 49 per chunk.
    b, t, d, v = 6, 9, 24, 97
    counts = {}
    for chunk_bytes in (2**30, 1):
        call = record_call(b, t, d, v, torch.float32, chunk_bytes, ce_u=ce_u)
        counts[call["chunks"]] = sum(op not in VIEWS_AND_METADATA for op, _, _ in call["ops"])
    (one, one_ops), (many, many_ops) = sorted(counts.items())
    per_chunk = (many_ops - one_ops) / (many - one)
    assert per_chunk <= most_per_chunk and one_ops - per_chunk <= 20, counts


def test_default_chunks_have_a_row_floor_independent_of_the_vocabulary():
    # The default budget: max(CHUNK_BYTES, 4 V MIN_CHUNK_ROWS) bytes, i.e. >= MIN_CHUNK_ROWS rows at
    # any V, so greedy whole-sequence chunks number < 2 N / MIN_CHUNK_ROWS + 1 (two neighbours
    # together exceed the budget) and dW takes at most that many - 1 read-modify-writes.
    n, length = 16384, 512
    sequence_ids = torch.arange(n) // length
    for v in (1009, 32003, 128256, 262147, 1_000_003):
        budget = one_pass.chunk_budget(v, None)
        assert budget // (4 * v) >= one_pass.MIN_CHUNK_ROWS
        bounds = one_pass.chunk_rows(sequence_ids, n // length, v, budget, max_bytes=budget)
        assert len(bounds) - 1 < 2 * n / one_pass.MIN_CHUNK_ROWS + 1, (v, bounds)
        assert len(bounds) - 1 <= 8
    assert one_pass.chunk_budget(128256, 12345) == 12345  # an explicit budget is taken as given


def test_an_over_long_sequence_is_refused_naming_it():
    counts = [3, 0, 5, 9, 2]
    sequence_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    vocab = 10
    # Alone over the budget but within the cap: its own chunk, as before.
    assert one_pass.chunk_rows(sequence_ids, 5, vocab, 4 * vocab * 4, max_bytes=4 * vocab * 9) == [0, 3, 8, 17, 19]
    with pytest.raises(ValueError, match=r"labels: sequence 3 has 9 target tokens"):
        one_pass.chunk_rows(sequence_ids, 5, vocab, 4 * vocab * 4, max_bytes=4 * vocab * 8)


def test_an_over_long_sequence_is_refused_through_the_public_path(monkeypatch):
    monkeypatch.setattr(one_pass, "MAX_CHUNK_BYTES", 4 * 31 * 5)
    b, t, d, v = 3, 8, 16, 31
    hidden, weight, labels, _ = make_inputs(b, t, d, v, torch.float32, drop_prefix=False)
    labels[:4] = IGNORE  # sequence 0: 4 target tokens, within the cap of 5 rows
    labels[t : t + 2] = IGNORE  # sequence 1: 6, the first over it (sequence 2: 8)
    with pytest.raises(ValueError, match=r"labels: sequence 1 has 6 target tokens.*design='two_sweep'"):
        fused_sequence_loss(
            hidden.requires_grad_(),
            weight,
            labels,
            t,
            lambda logps: logps.sum(),
            ignore_index=IGNORE,
            impl="torch",
            filter_eps=None,
            design="one_pass",
            chunk_bytes=4 * v,
        )
