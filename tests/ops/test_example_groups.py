"""ops.example_loss(groups=...): a loss that is a sum of per-GROUP terms (DPO's pairs: a forget answer
and its winner in one term) through the one-pass design, which then gathers the kept rows in group
order and chunks whole groups, so each term's examples are complete when its gradient is taken.

Checked against a plain float64 formula written here (full logits, autograd) and against the
two-call design, with chunk budgets that hold one group or a few; the same call without groups is
shown to be wrong (the pairs' examples land in different chunks), so the comparison can fail.
"""

import itertools

import pytest
import torch
from helpers import assert_as_good_as_torch, value_and_grads

from fastnpo import losses
from fastnpo.ops import autograd, example_loss, one_pass

PAIRS = 3  # examples 0..2 lose to examples 3..5 (pair i: i and PAIRS + i); 6 and 7 are alone


def make_rows(d, v, dtype, rows_each=4, seed=0):
    """hidden [N, d], weight [v, d], targets [N], owner [N], groups [8]: 8 examples in row order
    with an unowned row between them (a prompt), so a pair's two examples are far apart."""
    generator = torch.Generator().manual_seed(seed)
    owner = []
    for example in range(2 * PAIRS + 2):
        owner += [-1] + [example] * (rows_each + example % 3)
    owner = torch.tensor(owner)
    hidden = torch.randn(owner.numel(), d, generator=generator, dtype=torch.float64) * 2
    weight = torch.randn(v, d, generator=generator, dtype=torch.float64) / d**0.5
    targets = torch.randint(0, v, (owner.numel(),), generator=generator)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    return hidden.to(dtype), weight.to(dtype), targets, owner, groups


def dpo_closure(reference):
    """DPO of each pair (winner PAIRS + i over loser i) plus an NLL of the two unpaired examples:
    a sum of per-group terms, not of per-example ones."""

    def loss(logps):
        dpo = losses.dpo_from_logprobs(
            logps[PAIRS : 2 * PAIRS], logps[:PAIRS], reference[PAIRS : 2 * PAIRS], reference[:PAIRS], beta=0.4
        )
        return dpo - logps[2 * PAIRS :].sum() / 30

    return loss


def plain(hidden, weight, targets, owner, loss):
    logp = (hidden @ weight.T).log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]
    logp = torch.where(owner >= 0, logp, 0.0)
    return loss(logp.new_zeros(2 * PAIRS + 2).index_add(0, owner.clamp(min=0), logp))


def grouped(targets, owner, loss, chunk_rows, groups, design="one_pass"):
    return lambda h, w: example_loss(
        h, w, targets, owner, 2 * PAIRS + 2, loss, design=design, chunk_bytes=4 * w.shape[0] * chunk_rows, groups=groups
    )


@pytest.mark.parametrize("upstream", [1.0, -0.7])
@pytest.mark.parametrize("chunk_rows", [1, 12, 1000])  # one group per chunk .. everything in one
@pytest.mark.parametrize("v", [17, 257])
def test_grouped_one_pass_matches_float64(v, chunk_rows, upstream):
    hidden, weight, targets, owner, groups = make_rows(12, v, torch.float32)
    reference = torch.randn(2 * PAIRS + 2, dtype=torch.float64) * 3 - 25
    loss = dpo_closure(reference)
    ours = value_and_grads(
        grouped(targets, owner, dpo_closure(reference.float()), chunk_rows, groups), hidden, weight, upstream
    )
    same = value_and_grads(
        lambda h, w: plain(h, w, targets, owner, dpo_closure(reference.float())), hidden, weight, upstream
    )
    ref = value_and_grads(lambda h, w: plain(h, w, targets, owner, loss), hidden.double(), weight.double(), upstream)
    for got, same_dtype, want, name in zip(ours, same, ref, ("loss", "dH", "dW"), strict=True):
        assert_as_good_as_torch(got, same_dtype, want, 5e-4, name)
    assert torch.all(ours[1][owner < 0] == 0), "an unowned row got a gradient"


def test_without_groups_the_pairs_split_and_the_gradient_is_wrong():
    # The same loss, chunks of ~one example: ungrouped, a pair's loser is chunked before its winner
    # is seen (its placeholder 0), and its gradient is off; grouped, it equals two_call's.
    hidden, weight, targets, owner, groups = make_rows(12, 33, torch.float32)
    loss = dpo_closure(torch.randn(2 * PAIRS + 2) * 3 - 25)
    two_call = value_and_grads(grouped(targets, owner, loss, 6, None, "two_call"), hidden, weight)
    with_groups = value_and_grads(grouped(targets, owner, loss, 6, groups), hidden, weight)
    without = value_and_grads(grouped(targets, owner, loss, 6, None), hidden, weight)
    for a, b in zip(with_groups, two_call, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(without[1], two_call[1], atol=1e-3, rtol=1e-2)


def test_chunks_hold_whole_groups_in_group_order():
    _, _weight, _, owner, groups = make_rows(12, 33, torch.float32)
    row_ids, examples, bounds = autograd._grouped_rows(owner, groups, 33, 4 * 33 * 6)
    assert sorted(row_ids.tolist()) == (owner >= 0).nonzero()[:, 0].tolist()  # every kept row once
    assert torch.equal(examples, owner[row_ids])
    chunk_groups = [set(groups[examples[a:b]].tolist()) for a, b in itertools.pairwise(bounds)]
    assert len(chunk_groups) >= 3
    for i, seen in enumerate(chunk_groups):  # no group in two chunks, and groups in order
        assert not seen & set().union(*chunk_groups[:i]), chunk_groups
    assert max(chunk_groups[0]) < min(chunk_groups[-1])


def test_an_over_long_group_is_refused_naming_it(monkeypatch):
    hidden, weight, targets, owner, groups = make_rows(12, 33, torch.float32)
    monkeypatch.setattr(one_pass, "MAX_CHUNK_BYTES", 4 * 33 * 8)
    loss = dpo_closure(torch.randn(2 * PAIRS + 2) - 20)
    match = r"labels: example group 1 has 10 target tokens.*cannot split one example group"
    with pytest.raises(ValueError, match=match):
        example_loss(hidden, weight, targets, owner, 2 * PAIRS + 2, loss, chunk_bytes=4 * 33, groups=groups)


@pytest.mark.parametrize(
    "groups,error,match",
    [
        (
            torch.tensor([0, 1, 2, 0, 1, 2, 3]),
            ValueError,
            r"groups must have shape \[8\] \(one per example\), got \(7,\)",
        ),
        (torch.zeros(8), TypeError, "groups must be an integer tensor"),
        (torch.tensor([0, 1, 2, 0, 1, 2, 3, -1]), ValueError, "groups must be >= 0, got -1"),
    ],
)
def test_bad_groups_are_refused_naming_the_argument(groups, error, match):
    hidden, weight, targets, owner, _ = make_rows(8, 17, torch.float32)
    with pytest.raises(error, match=match):
        example_loss(hidden, weight, targets, owner, 8, torch.sum, groups=groups)


def test_the_epilogue_design_refuses_groups():
    hidden, weight, targets, owner, groups = make_rows(8, 17, torch.float32)
    with pytest.raises(ValueError, match="groups: design 'epilogue' chunks whole examples only"):
        example_loss(hidden, weight, targets, owner, 8, torch.sum, design="epilogue", groups=groups)
