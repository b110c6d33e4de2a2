"""design="epilogue" (fastnpo/ops/experimental/epilogue.py, kernels/epilogue_forward.py, kernels/epilogue_backward.py).

The logits GEMM's epilogue keeps per-(row, tile) maxima and sums of exp, E = exp(z - tile max) in the
operand dtype and the exact target logit; dH and dW are GEMMs that scale E per (row, tile) while
loading it. Everything runs under the interpreter here on tiny odd shapes (N, D, V not multiples of
the tiles) and is checked against float64 formulas written below (full logits, autograd); a
low-precision result is judged against plain torch in the same dtype (helpers.assert_as_good_as_torch).
"""

import functools

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    assert_as_good_as_torch,
    fused_loss_fn,
    sequence_logprobs_plain,
    token_logprobs_plain,
    value_and_grads,
)

import fastnpo
from fastnpo import losses
from fastnpo.kernels import epilogue_backward, epilogue_forward
from fastnpo.ops import fused_sequence_loss
from fastnpo.ops.experimental import epilogue as fused_epilogue

IGNORE = -100
BETA = 0.37
DTYPES = [(torch.float32, 5e-4), (torch.bfloat16, 1e-2)]
DEV = TRITON_DEVICE


def make_batch(b, t, d, v, dtype, *, scale=2.0):
    """hidden [b*t, d], weight [v, d], aligned labels [b*t]: each sequence a prompt prefix of ignored
    labels (the first sequence's whole row when b > 1: a sequence with no kept row), the last row
    right padding."""
    hidden = (torch.randn(b * t, d, dtype=torch.float64) * scale).to(dtype).to(DEV)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(DEV)
    labels = torch.randint(0, v, (b, t))
    for row in range(b):
        labels[row, : int(torch.randint(1, t - 1, ()))] = IGNORE
    if b > 1:
        labels[0] = IGNORE
    labels[-1, -1] = IGNORE
    return hidden, weight, labels.reshape(-1).to(DEV)


def check_loss_against_float64(hidden, weight, labels, t, tol, chunk_bytes, upstream, **requires_grad):
    """The epilogue design vs float64 and plain torch in the inputs' dtype: an NPO loss with weights."""
    b = labels.numel() // t
    true_logps = sequence_logprobs_plain(hidden.double(), weight.double(), labels, t, torch.float64)
    noise, weights = torch.randn(b, dtype=torch.float64, device=DEV) * 3, torch.rand(b, device=DEV) * 2
    ref_logps = (true_logps + noise).float()

    def loss_fn(logps):
        return losses.npo_from_logprobs(logps, ref_logps.to(logps.dtype), beta=BETA, weights=weights.to(logps.dtype))

    design = fused_loss_fn(labels, t, loss_fn, chunk_bytes, "epilogue")
    ours = value_and_grads(design, hidden, weight, upstream, **requires_grad)
    plain = value_and_grads(
        lambda h, w: loss_fn(sequence_logprobs_plain(h, w, labels, t, torch.float32)),
        hidden,
        weight,
        upstream,
        **requires_grad,
    )
    ref = value_and_grads(
        lambda h, w: loss_fn(sequence_logprobs_plain(h, w, labels, t, torch.float64)),
        hidden.double(),
        weight.double(),
        upstream,
        **requires_grad,
    )
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    assert_as_good_as_torch(ours[0], plain[0], ref[0], tol, "loss")
    for got, same_dtype, want, like, name in zip(
        ours[1:], plain[1:], ref[1:], (hidden, weight), ("dH", "dW"), strict=True
    ):
        if want is None:
            assert got is None, f"{name} computed for an input that does not require grad"
            continue
        assert got.dtype == like.dtype and torch.isfinite(got).all()
        assert_as_good_as_torch(got, same_dtype, want, tol, name)
    return ours


# ---------------------------------------------------------------- the design through the public entry


@pytest.mark.parametrize("dtype,tol", [*DTYPES, (torch.float16, 1e-2)])
@pytest.mark.parametrize("b,t,d,v", [(1, 5, 16, 33), (3, 7, 40, 97), (3, 17, 24, 257)])
def test_epilogue_loss_and_gradients_match_float64(b, t, d, v, dtype, tol):
    hidden, weight, labels = make_batch(b, t, d, v, dtype)
    # Half the kept rows' E per chunk: several chunks whenever two sequences have rows (dW then
    # takes the read-modify-write path), one when a single sequence does.
    sequence_ids = (labels != IGNORE).nonzero()[:, 0] // t
    chunk_bytes = dtype.itemsize * v * max(1, sequence_ids.numel() // 2)
    chunks = len(fused_epilogue.epilogue_chunks(sequence_ids, b, v, dtype.itemsize, chunk_bytes)) - 1
    assert chunks == 1 if sequence_ids.unique().numel() == 1 else chunks >= 2
    _, dh, _ = check_loss_against_float64(hidden, weight, labels, t, tol, chunk_bytes, upstream=-1.7)
    assert torch.all(dh[labels == IGNORE] == 0), "an ignored row got a gradient"


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("hidden_grad,weight_grad", [(True, False), (False, True), (False, False)])
def test_epilogue_computes_only_the_gradients_asked_for(hidden_grad, weight_grad, dtype, tol):
    hidden, weight, labels = make_batch(3, 6, 24, 61, dtype)
    requires = dict(hidden_grad=hidden_grad, weight_grad=weight_grad)
    _, dh, dw = check_loss_against_float64(hidden, weight, labels, 6, tol, None, upstream=0.6, **requires)
    assert (dh is None) != hidden_grad and (dw is None) != weight_grad


def test_epilogue_large_logits_and_a_label_holding_most_mass():
    # |logit| ~ 100 (exp overflows fp32 at 88 without the tile max) and rows where p_y ~ 1, whose
    # label column g (1 - p_y) comes from the exact target, not from 1 - a rounded E.
    b, t, d, v = 2, 6, 16, 45
    hidden, weight, labels = make_batch(b, t, d, v, torch.float32, scale=1.0)
    hidden = hidden * 25
    kept = labels != IGNORE
    labels[kept] = (hidden[kept] @ weight.T).argmax(dim=1)  # the label is the row's largest logit
    check_loss_against_float64(hidden, weight, labels, t, 5e-4, None, upstream=1.0)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    labels_b = labels.clone()
    labels_b[kept] = (hb[kept].double() @ wb.double().T).argmax(dim=1)
    check_loss_against_float64(hb, wb, labels_b, t, 1e-2, None, upstream=1.0)


def test_npo_and_ga_accept_fused_epilogue_and_agree_with_the_two_call_path():
    hidden, weight, labels = make_batch(3, 8, 24, 53, torch.float32)
    labels[:8] = torch.randint(0, 53, (8,))  # every sequence needs a target for npo_loss
    h3, y2 = hidden.view(3, 8, 24), labels.view(3, 8)
    ref_logps = torch.randn(3) * 5 - 20

    for loss in (
        lambda h, w, design: fastnpo.npo_loss(h, w, y2, ref_logps, beta=BETA, design=design, impl="torch"),
        lambda h, w, design: fastnpo.ga_loss(h, w, y2, design=design, impl="torch"),
    ):
        got = value_and_grads(functools.partial(loss, design="epilogue"), h3, weight, upstream=0.8)
        want = value_and_grads(functools.partial(loss, design="two_call"), h3, weight, upstream=0.8)
        for a, b_, name in zip(got, want, ("loss", "dH", "dW"), strict=True):
            torch.testing.assert_close(a, b_, atol=2e-5 * max(1.0, b_.abs().max().item()), rtol=0, msg=name)


def test_epilogue_refuses_a_second_backward():
    hidden, weight, labels = make_batch(2, 6, 16, 37, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused_loss_fn(labels, 6, torch.sum, None, "epilogue")(h, weight)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()


# ---------------------------------------------------------------- the forward-only form


@pytest.mark.parametrize("dtype,tol", [*DTYPES, (torch.float16, 1e-2)])
@pytest.mark.parametrize("n,d,v,scale", [(1, 16, 17, 3.0), (19, 37, 101, 3.0), (40, 24, 257, 30.0)])
def test_forward_only_logprobs_match_float64(n, d, v, scale, dtype, tol):
    hidden = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype).to(DEV)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype).to(DEV)
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[torch.rand(n, device=DEV) < 0.3] = IGNORE
    ours = fused_epilogue.epilogue_token_logprobs(hidden, weight, labels, ignore_index=IGNORE)
    assert ours.dtype == torch.float32 and ours.shape == (n,) and not ours.requires_grad
    assert torch.all(ours[labels == IGNORE] == 0.0)
    ref = token_logprobs_plain(hidden.double(), weight.double(), labels, torch.float64)
    plain = token_logprobs_plain(hidden, weight, labels, torch.float32)
    assert_as_good_as_torch(ours, plain, ref, tol, "log-probs")
    # The log-probs come from the exact fp32 target and statistics: fp32 class even for bf16 inputs
    # (the inputs' rounding is the reference's too: it starts from the same bf16 numbers).
    assert (ours.double() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_forward_only_row_blocks_and_all_ignored(monkeypatch):
    hidden, weight, labels = make_batch(3, 9, 20, 70, torch.float32)
    ref = token_logprobs_plain(hidden.double(), weight.double(), labels, torch.float64)
    monkeypatch.setattr(fused_epilogue, "STATS_BYTES", 8 * epilogue_forward.num_tiles(70) * 4)  # 4 rows a launch
    ours = fused_epilogue.epilogue_token_logprobs(hidden, weight, labels, ignore_index=IGNORE)
    assert (ours.double() - ref).abs().max().item() < 1e-4
    none = fused_epilogue.epilogue_token_logprobs(hidden, weight, torch.full_like(labels, 7), ignore_index=7)
    assert torch.equal(none, torch.zeros_like(none))


# ---------------------------------------------------------------- the kernels alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kernel_partials_and_e(dtype):
    n_all, n, d, v = 23, 17, 40, 75  # V not a multiple of TILE_V: a ragged last tile
    hidden = (torch.randn(n_all, d) * 2).to(dtype).to(DEV)
    weight = (torch.randn(v, d) / d**0.5).to(dtype).to(DEV)
    row_ids = torch.randperm(n_all, device=DEV)[:n].sort().values
    labels = torch.randint(0, v, (n,), device=DEV)
    e, tile_max, tile_sum, target = epilogue_forward.epilogue_forward(hidden, weight, row_ids, labels, store_e=True)
    tiles, tv = epilogue_forward.num_tiles(v), epilogue_forward.TILE_V
    assert e.shape == (n, v) and e.dtype == dtype and tile_max.shape == tile_sum.shape == (n, tiles)
    z = hidden[row_ids].double() @ weight.double().T
    padded = torch.full((n, tiles * tv), float("-inf"), dtype=torch.float64, device=DEV)
    padded[:, :v] = z
    m64 = padded.view(n, tiles, tv).amax(dim=2)
    e64 = (padded.view(n, tiles, tv) - m64[..., None]).exp()
    torch.testing.assert_close(tile_max.double(), m64, atol=1e-4 * max(1.0, m64.abs().max().item()), rtol=0)
    torch.testing.assert_close(tile_sum.double(), e64.sum(dim=2), atol=1e-4, rtol=1e-4)
    # bf16: one rounding of a value <= 1, half an ulp (2^-8 relative) on GPU; triton's interpreter
    # converts fp32 -> bf16 by truncation (checked with triton 3.9): up to a whole ulp there.
    rel = 1e-5 if dtype == torch.float32 else (2**-8 if DEV == "cuda" else 2**-7)
    torch.testing.assert_close(e.double(), e64.view(n, -1)[:, :v], atol=1e-6, rtol=rel)
    torch.testing.assert_close(target.double(), z.gather(1, labels[:, None])[:, 0], atol=1e-4, rtol=0)
    # The forward-only launch: the same statistics, no E.
    e2, max2, sum2, target2 = epilogue_forward.epilogue_forward(hidden, weight, row_ids, labels, store_e=False)
    assert e2 is None
    assert torch.equal(max2, tile_max) and torch.equal(sum2, tile_sum) and torch.equal(target2, target)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_backward_kernels_against_float64_and_leave_other_rows_alone(dtype, tol):
    n_all, n, d, v = 29, 21, 40, 75
    hidden = (torch.randn(n_all, d) * 2).to(dtype).to(DEV)
    weight = (torch.randn(v, d) / d**0.5).to(dtype).to(DEV)
    row_ids = torch.randperm(n_all, device=DEV)[:n].sort().values
    labels = torch.randint(0, v, (n,), device=DEV)
    grad = torch.randn(n, device=DEV)
    e, tile_max, tile_sum, target = epilogue_forward.epilogue_forward(hidden, weight, row_ids, labels, store_e=True)
    lse = fused_epilogue.fold_partials(tile_max, tile_sum)
    scale, label_grad = fused_epilogue.backward_scales(tile_max, lse, target - lse, grad)

    h64, w64 = hidden.double(), weight.double()
    z = h64[row_ids] @ w64.T
    onehot = torch.nn.functional.one_hot(labels, v).double()
    dlogits = grad.double()[:, None] * (onehot - z.softmax(dim=1))
    dh_want = torch.zeros(n_all, d, dtype=torch.float64, device=DEV)
    dh_want[row_ids] = dlogits @ w64
    dw_want = dlogits.T @ h64[row_ids]
    # plain torch in the dtype: bf16 logits, fp32 softmax, bf16 dlogits, matmuls in the dtype
    zp = (hidden[row_ids] @ weight.T).float()
    dlp = (grad[:, None] * (onehot.float() - zp.softmax(dim=1))).to(dtype)
    dh_plain = torch.zeros(n_all, d, dtype=dtype, device=DEV)
    dh_plain[row_ids] = dlp @ weight
    dw_plain = dlp.T @ hidden[row_ids]

    dh = torch.full((n_all, d), float("nan"), dtype=dtype, device=DEV)  # poisoned
    epilogue_backward.epilogue_dh(e, scale, labels, label_grad, weight, row_ids, dh)
    others = torch.ones(n_all, dtype=torch.bool, device=DEV)
    others[row_ids] = False
    assert dh[others].isnan().all(), "dH rows outside row_ids were written"
    assert_as_good_as_torch(dh[row_ids], dh_plain[row_ids], dh_want[row_ids], tol, "dH")

    dw = torch.full((v, d), float("nan"), dtype=dtype, device=DEV)  # poisoned: the first write reads nothing
    epilogue_backward.epilogue_dw(e, scale, labels, label_grad, hidden[row_ids], dw, accumulate=False)
    assert_as_good_as_torch(dw, dw_plain, dw_want, tol, "dW")
    base = torch.randn(v, d, device=DEV).to(dtype)
    acc = base.clone()
    epilogue_backward.epilogue_dw(e, scale, labels, label_grad, hidden[row_ids], acc, accumulate=True)
    assert_as_good_as_torch(acc, (base.float() + dw_plain.float()).to(dtype), base.double() + dw_want, tol, "dW added")


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument(monkeypatch):
    hidden, weight, labels = make_batch(2, 6, 16, 37, torch.float32)
    call = fused_epilogue.epilogue_token_logprobs
    with pytest.raises(TypeError, match="hidden must be float32"):
        call(hidden.double(), weight, labels)
    with pytest.raises(TypeError, match="weight dtype"):
        call(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="hidden must have 2 dimensions"):
        call(hidden.view(2, 6, 16), weight, labels)
    with pytest.raises(ValueError, match="weight has hidden_dim 15"):
        call(hidden, weight[:, :15], labels)
    with pytest.raises(ValueError, match="labels shape"):
        call(hidden, weight, labels[:5])
    bad = labels.clone()
    bad[3] = 37
    with pytest.raises(ValueError, match="labels contains 37"):
        call(hidden, weight, bad)
    with pytest.raises(ValueError, match="chunk_bytes must be"):
        fused_loss_fn(labels, 6, torch.sum, 0, "epilogue")(hidden, weight)
    with pytest.raises(ValueError, match="design must be"):
        fused_sequence_loss(
            hidden, weight, labels, 6, torch.sum, ignore_index=IGNORE, impl="torch", filter_eps=None, design="epilog"
        )
    # A sequence whose E alone exceeds the cap (2 rows here) is refused before any work, naming it.
    labels[6:] = torch.randint(0, 37, (6,), device=DEV)
    monkeypatch.setattr(fused_epilogue, "MAX_CHUNK_BYTES", 4 * 37 * 2)
    h = hidden.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"labels: design='epilogue'.*sequence 1"):
        fused_loss_fn(labels, 6, torch.sum, 4 * 37, "epilogue")(h, weight)
    assert h.grad is None


def test_off_triton_devices_the_design_says_so(monkeypatch):
    hidden, weight, labels = make_batch(2, 6, 16, 37, torch.float32)
    if DEV != "cpu":
        pytest.skip("a CUDA device always runs Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time (matmuls.triton_runs_on)
    with pytest.raises(ValueError, match="design='epilogue' runs Triton kernels: hidden must be a CUDA tensor"):
        fused_loss_fn(labels, 6, torch.sum, None, "epilogue")(hidden.requires_grad_(), weight)
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        fused_epilogue.epilogue_token_logprobs(hidden.detach(), weight, labels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_epilogue_on_cuda(dtype, tol):
    b, t, d, v = 12, 160, 256, 5003
    hidden, weight, labels = make_batch(b, t, d, v, dtype)
    check_loss_against_float64(hidden, weight, labels, t, tol, dtype.itemsize * v * 3 * t, upstream=0.9)


# ---------------------------------------------------------------- the call's budget, counted on CPU


def record_design_call(b, t, d, v, dtype, chunk_bytes, monkeypatch, compute_dh=True, compute_dw=True):
    """One epilogue_sequence_loss call with the three Triton launchers swapped for recorders that
    return buffers of the right shapes (no interpreter: the torch side of the design, counted at the
    ATen level with test_one_pass_budget's Recorder, and the kernels' launches with their sizes)."""
    from test_one_pass_budget import Recorder

    hidden, weight, labels = make_batch(b, t, d, v, dtype)
    hidden, weight, labels = hidden.cpu(), weight.cpu(), labels.cpu()
    row_ids = (labels != IGNORE).nonzero()[:, 0]
    tiles = epilogue_forward.num_tiles(v)
    kernels = []

    def forward(h, w, ids, targets, store_e):
        n = ids.numel()
        kernels.append(("forward", n, store_e))
        e = torch.empty(n, v, dtype=h.dtype) if store_e else None
        return e, torch.randn(n, tiles), torch.rand(n, tiles) + 1, torch.randn(n)

    monkeypatch.setattr(epilogue_forward, "epilogue_forward", forward)
    monkeypatch.setattr(epilogue_backward, "epilogue_dh", lambda e, *a: kernels.append(("dh", e.shape[0], None)))
    monkeypatch.setattr(
        epilogue_backward,
        "epilogue_dw",
        lambda e, *a, accumulate: kernels.append(("dw", e.shape[0], accumulate)),
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton_runs_on: the design's device check passes on CPU
    tolist_calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        tolist_calls.append(self.numel())
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

    def closure(logps):
        return (torch.rand(b) * torch.nn.functional.softplus(0.3 * logps)).sum()

    with Recorder() as recorder:
        fused_epilogue.epilogue_sequence_loss(
            hidden,
            weight,
            row_ids,
            labels[row_ids].contiguous(),
            row_ids // t,
            b,
            closure,
            compute_dh=compute_dh,
            compute_dw=compute_dw,
            chunk_bytes=chunk_bytes,
        )
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    bounds = fused_epilogue.epilogue_chunks(row_ids // t, b, v, dtype.itemsize, chunk_bytes)
    return dict(ops=recorder.ops, kernels=kernels, tolist=tolist_calls, bounds=bounds, n=row_ids.numel())


# ATen ops of the torch side per chunk (index slices, the glue on the [n, T] partials, the closure's
# autograd and its rand, the rows' gather, the recorders' own 4 allocations): 217 for 5 chunks with
# torch 2.13, i.e. ~43 per chunk; a pass of a few ops added to the loop exceeds the budget below.
OPS_PER_CHUNK, OPS_FIXED = 44, 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_design_budget_no_sync_6ndv_few_ops(dtype, monkeypatch):
    from helpers import SYNCING_OPS as SYNCING

    b, t, d, v = 6, 9, 24, 97
    call = record_design_call(b, t, d, v, dtype, dtype.itemsize * v, monkeypatch)  # each sequence alone
    chunks = len(call["bounds"]) - 1
    assert chunks == b - 1  # the first sequence has no kept row
    # One .tolist() (the chunk boundaries, before the loop), no syncing op anywhere.
    assert len(call["tolist"]) == 1, call["tolist"]
    synced = [op for op, _, _ in call["ops"] if op in SYNCING]
    assert not synced, synced
    # Three launches per chunk; the first chunk writes dW, every later one accumulates.
    kinds = [k for k, _, _ in call["kernels"]]
    assert kinds == ["forward", "dh", "dw"] * chunks, kinds
    assert [acc for k, _, acc in call["kernels"] if k == "dw"] == [False] + [True] * (chunks - 1)
    # FLOPs: 2 n D V per launch, 6 N D V in all (N kept rows): the floor, no recompute.
    flops = sum(2 * n * d * v for _, n, _ in call["kernels"])
    assert flops == 6 * call["n"] * d * v
    # Neither gradient is zero-filled (dH's dropped rows only: index_fill_), nothing of [V, D] filled.
    fills = [shapes for op, shapes, _ in call["ops"] if op in (torch.ops.aten.zero_, torch.ops.aten.zeros)]
    assert all((v, d) not in s and (b * t, d) not in s for s in fills), fills
    assert len(call["ops"]) <= OPS_PER_CHUNK * chunks + OPS_FIXED, len(call["ops"])


def test_design_budget_forward_only_call_stores_no_e(monkeypatch):
    b, t, d, v = 4, 7, 16, 61
    call = record_design_call(b, t, d, v, torch.bfloat16, None, monkeypatch, compute_dh=False, compute_dw=False)
    assert call["kernels"] == [("forward", call["n"], False)]  # one row block, no E, no backward launch
    assert call["tolist"] == []  # no whole-sequence chunking without gradients: no sync at all
