"""design="one_pass" with CE-U's per-token values (token_values="ce_u", ops/one_pass.py): CE-U's
per-token loss LSE(l) - sum_{v != y} q_v l_v (q the label-excluded softmax, detached) and its
gradients from two more row statistics, chunk by chunk, against a float64 formula written here
(full logits, autograd).

The regime that matters is memorised forget data, p_y ~ 1: the label-excluded statistics must
come from the other columns themselves (never all columns minus the label's) and the gradient
must stay bounded (never p_y / (1 - p_y) times a difference that cancels). Rows whose label leads
by 9, 30 and 100 nats are in every batch. The torch-op epilogue runs with fp32 operands, the
Triton epilogue kernels (under the interpreter off GPU) with the CUDA path's bf16 / fp16 operands
emulated (helpers.LowPrecisionOperands).
"""

import pytest
import torch
from helpers import TRITON_DEVICE, LowPrecisionOperands, assert_as_good_as_torch, value_and_grads

from fastnpo.ops import example_loss, one_pass

MARGINS = (9.0, 30.0, 100.0)  # nats by which a dominant row's label leads: 1 - p_y down to ~e^-100


def make_inputs(examples, rows_each, d, v, dtype, device="cpu"):
    """hidden [N, d + 3], weight [v, d + 3], targets [N], owner [N]: `examples` examples of
    `rows_each` rows in order with an unowned row (-1) between them; three rows whose label leads
    the other logits by MARGINS (a column of their own in the extra dimensions)."""
    owner = []
    for example in range(examples):
        owner += [example] * rows_each + [-1]
    owner = torch.tensor(owner)
    n = owner.numel()
    hidden = torch.randn(n, d + 3, dtype=torch.float64)
    weight = torch.randn(v, d + 3, dtype=torch.float64) / d**0.5
    targets = torch.randint(0, v, (n,))
    hidden[:, d:] = 0
    weight[:, d:] = 0
    owned = (owner >= 0).nonzero()[:, 0]
    dominant = owned[torch.randperm(owned.numel())[:3]]
    labels = torch.randperm(v)[:3] if v >= 3 else torch.tensor([0, 1, 0])
    for k, (row, margin) in enumerate(zip(dominant.tolist(), MARGINS, strict=True)):
        targets[row] = labels[k]
        weight[labels[k], d + k] = 1.0
        hidden[row, d + k] = margin + (hidden[row, :d] @ weight[:, :d].T).abs().max()
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device), owner, dominant


def closure(owner, num_examples, seed=0):
    """A loss of per-example log-probs and per-row CE-U values: fixed random coefficients of either
    sign (a retain NLL's and a forget mean's shape), the unowned rows' values unused."""
    generator = torch.Generator().manual_seed(seed)
    per_example = torch.randn(num_examples, generator=generator, dtype=torch.float64)
    per_row = torch.randn(owner.numel(), generator=generator, dtype=torch.float64) * (owner >= 0)

    def loss(sequence_logps, token_values):
        return (sequence_logps * per_example.to(sequence_logps)).sum() + (token_values * per_row.to(token_values)).sum()

    return loss


def plain_loss(hidden, weight, targets, owner, num_examples, loss, dtype):
    """The float64 (or same-dtype) formula: full logits, CE-U toward the detached label-excluded
    softmax, per-example sums of the token log-probs."""
    logits = (hidden.to(dtype) @ weight.to(dtype).T).cpu()
    logp = logits.log_softmax(dim=-1)
    owned = owner >= 0
    token_logps = torch.where(owned, logp.gather(1, targets.cpu()[:, None])[:, 0], 0.0)
    sequence_logps = token_logps.new_zeros(num_examples).index_add(0, owner.clamp(min=0), token_logps)
    q = logits.detach().scatter(1, targets.cpu()[:, None], float("-inf")).softmax(dim=-1)
    ce_u = torch.where(owned, -(q * logp).sum(dim=-1), 0.0)
    return loss(sequence_logps, ce_u)


def ours(hidden, weight, targets, owner, num_examples, loss, chunk_bytes):
    return lambda h, w: example_loss(
        h,
        w,
        targets,
        owner,
        num_examples,
        loss,
        design="one_pass",
        chunk_bytes=chunk_bytes,
        token_level=True,
        token_values="ce_u",
    )


def check(hidden, weight, targets, owner, examples, chunk_bytes, tol, upstream):
    loss = closure(owner, examples)
    got = value_and_grads(ours(hidden, weight, targets, owner, examples, loss, chunk_bytes), hidden, weight, upstream)
    plain = value_and_grads(
        lambda h, w: plain_loss(h, w, targets, owner, examples, loss, torch.float32), hidden, weight, upstream
    )
    ref = value_and_grads(
        lambda h, w: plain_loss(h, w, targets, owner, examples, loss, torch.float64),
        hidden.double(),
        weight.double(),
        upstream,
    )
    for mine, same_dtype, want, name in zip(got, plain, ref, ("loss", "dH", "dW"), strict=True):
        assert torch.isfinite(mine).all(), name
        assert_as_good_as_torch(mine, same_dtype, want, tol, name)
    return got, ref


@pytest.mark.parametrize("upstream", [1.0, -0.6])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])  # one sequence per chunk .. all in one
@pytest.mark.parametrize("v", [2, 33, 257])
def test_ce_u_one_pass_matches_float64_with_fp32_operands(v, chunk_rows, upstream):
    hidden, weight, targets, owner, _ = make_inputs(4, 5, 16, v, torch.float32)
    check(hidden, weight, targets, owner, 4, 4 * v * chunk_rows, 5e-4, upstream)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [2, 33, 257])
def test_ce_u_one_pass_matches_float64_through_the_epilogue_kernels(v, dtype, monkeypatch):
    monkeypatch.setattr(one_pass, "Matmuls", LowPrecisionOperands)
    assert one_pass.epilogue_kernels(torch.device(TRITON_DEVICE), dtype) is not None
    hidden, weight, targets, owner, _ = make_inputs(3, 4, 16, v, dtype, TRITON_DEVICE)
    check(hidden, weight, targets.to(TRITON_DEVICE), owner, 3, 4 * v * 5, 1e-2, -1.3)


def test_memorised_rows_keep_exact_bounded_gradients():
    """At margins of 9, 30 and 100 nats, the dominant rows' gradient rows equal float64 to fp32
    precision, where the textbook route (p_y / (1 - p_y) times (onehot - p), 1 - p_y from fp32 lse)
    is off by orders of magnitude: shown on the same rows."""
    v = 64
    hidden, weight, targets, owner, dominant = make_inputs(4, 5, 16, v, torch.float32)
    (_, dh, _), (_, ref_dh, _) = check(hidden, weight, targets, owner, 4, 4 * v * 6, 5e-4, 1.0)
    scale = ref_dh.abs().max()
    assert (dh[dominant].double() - ref_dh[dominant]).abs().max() <= 1e-5 * scale
    # The textbook route on the same fp32 logits: the factor blows up, its dlogits lose everything.
    logits = hidden @ weight.T
    logp = logits.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]
    factor = logp.exp() / -torch.expm1(logp)
    assert not torch.isfinite(factor[dominant]).all() or factor[dominant].max() > 1e6


@pytest.mark.parametrize("v", [2, 33, 257])
def test_the_per_token_values_are_ce_u_to_fp32_precision(v):
    """The values handed to the loss, row by row (the loss value alone would hide a per-row error
    among many rows), memorised rows included: within a few fp32 roundings of float64."""
    hidden, weight, targets, owner, dominant = make_inputs(4, 5, 16, v, torch.float32)
    seen = {}

    def keep(sequence_logps, token_values):
        seen["values"] = token_values.detach().double()
        return closure(owner, 4)(sequence_logps, token_values)

    example_loss(hidden, weight, targets, owner, 4, keep, chunk_bytes=4 * v * 6, token_level=True, token_values="ce_u")
    logits = hidden.double() @ weight.double().T
    q = logits.scatter(1, targets[:, None], float("-inf")).softmax(dim=-1)
    want = torch.where(owner >= 0, -(q * logits.log_softmax(dim=-1)).sum(dim=-1), 0.0)
    err = (seen["values"] - want).abs()
    assert torch.all(err <= 2e-5 * (want.abs() + 1)), (err.max(), want[dominant])
    assert torch.all(want[dominant] > 8.0)  # the memorised rows' CE-U: about their margin


def test_one_pass_and_two_call_give_the_same_ce_u_loss():
    hidden, weight, targets, owner, _ = make_inputs(3, 6, 12, 41, torch.float32)
    loss = closure(owner, 3, seed=4)
    results = {
        design: value_and_grads(
            lambda h, w, design=design: example_loss(
                h,
                w,
                targets,
                owner,
                3,
                loss,
                design=design,
                chunk_bytes=4 * 41 * 7,
                token_level=True,
                token_values="ce_u",
            ),
            hidden,
            weight,
        )
        for design in ("two_call", "one_pass")
    }
    for a, b in zip(results["one_pass"], results["two_call"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_bad_token_values_and_a_one_token_vocabulary_are_refused():
    hidden, weight, targets, owner, _ = make_inputs(2, 3, 8, 5, torch.float32)
    loss = closure(owner, 2)
    with pytest.raises(ValueError, match=r"token_values must be one of \('logprob', 'ce_u'\), got 'ceu'"):
        example_loss(hidden, weight, targets, owner, 2, loss, token_level=True, token_values="ceu")
    with pytest.raises(ValueError, match="weight must have a vocabulary of at least 2 tokens for CE-U"):
        example_loss(
            hidden, weight[:1], torch.zeros_like(targets), owner, 2, loss, token_level=True, token_values="ce_u"
        )
