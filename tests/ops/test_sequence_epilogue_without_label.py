"""row_statistics(..., without_label=True) (kernels/sequence_epilogue.py): the label-excluded statistics of CE-U.

CE-U (Cross-Entropy Unlearning) needs, per row r with label y, the distribution WITHOUT the label's
column: lse_without_label = log sum_{v != y} exp(l_v) and mean_without_label = sum_{v != y} q_v l_v
(q = softmax over v != y). Checked against a plain float64 formula written here, on odd shapes
(ragged against the interpreter's 256-wide column block, and V = 2) inside a NaN-poisoned buffer,
with labels at the first and last columns and rows where the label dominates by +9, +30 and
+100 nats (1 - p_y down to ~e^-100: the forget data CE-U is for), a row where another column ties
the label and a row whose other columns are all equal. The naive fp32 S_all - exp(l_y) is shown to
fail on a +30 row where the kernel's direct sums do not. The variant's lse and target are checked
bitwise against the default call's (which tests/ops/test_one_pass.py checks against float64).
"""

import math

import pytest
import torch
from helpers import TRITON_DEVICE

from fastnpo.kernels import sequence_epilogue

# Row kinds, cycled over the rows (row 0 of a one-row input is the hardest: +100).
KINDS = ("+100", "random", "+9", "+30", "tie", "flat")


def inputs(n, v):
    """fp32 logits [n, v] (row offsets ~20, spread ~4) inside a NaN-poisoned buffer with extra rows and
    columns, labels at the first and last columns among random ones, one row kind per KINDS."""
    logits64 = torch.randn(n, v, dtype=torch.float64) * 4 + torch.randn(n, 1, dtype=torch.float64) * 20
    labels = torch.randint(0, v, (n,))
    labels[0], labels[-1] = 0, v - 1
    for r in range(n):
        kind, y = KINDS[r % len(KINDS)], int(labels[r])
        others = torch.arange(v) != y
        if kind.startswith("+"):  # the label dominates: p_y ~ 1, 1 - p_y ~ e^-gap
            logits64[r, y] = logits64[r, others].amax() + float(kind[1:])
        elif kind == "tie":  # another column equals the label's logit (ties in both maxima)
            logits64[r, y] = logits64[r, others].amax()
        elif kind == "flat":  # every other column equal: lse_without_label = c + log(V - 1), mean = c
            logits64[r, others] = logits64[r, 0] * 0 + 7.25
            logits64[r, y] = 11.5
    buffer = torch.full((n + 2, v + 7), float("nan"), device=TRITON_DEVICE)
    buffer[:n, :v] = logits64.float().to(TRITON_DEVICE)
    logits = buffer[:n, :v]
    return logits, logits.double().cpu(), labels.to(TRITON_DEVICE)  # the reference: the fp32 logits, exactly


def reference(exact, labels):
    """float64 (lse, lse_without_label, mean_without_label) of the fp32 logits."""
    label_col = torch.nn.functional.one_hot(labels.cpu(), exact.shape[1]).bool()
    others = exact.masked_fill(label_col, float("-inf"))
    q = others.softmax(dim=1)
    mean = torch.where(q > 0, q * others, 0.0).sum(dim=1)  # q = 0 at the label and at -inf logits
    return exact.logsumexp(dim=1), others.logsumexp(dim=1), mean


@pytest.mark.parametrize("v", [2, 33, 257, 1031])
@pytest.mark.parametrize("n", [1, 5, 17])
def test_without_label_statistics_match_float64(n, v):
    logits, exact, labels = inputs(n, v)
    lse, target, lse_wo, mean_wo = sequence_epilogue.row_statistics(logits, labels, without_label=True)
    assert all(t.dtype == torch.float32 and t.shape == (n,) for t in (lse, target, lse_wo, mean_wo))
    lse, target, lse_wo, mean_wo = (t.double().cpu() for t in (lse, target, lse_wo, mean_wo))
    assert all(torch.isfinite(t).all() for t in (lse, target, lse_wo, mean_wo)), "read outside the rows / columns?"
    ref_lse, ref_lse_wo, ref_mean_wo = reference(exact, labels)
    # a few fp32 roundings of each (its size included), as the lse test of tests/ops/test_one_pass.py
    err = (lse_wo - ref_lse_wo).abs()
    assert torch.all(err <= 2.0**-21 * (ref_lse_wo.abs() + 1)), (err, ref_lse_wo)
    err = (mean_wo - ref_mean_wo).abs()
    assert torch.all(err <= 1e-5 * (ref_mean_wo.abs() + 1)), (err, ref_mean_wo)
    assert torch.equal(target, exact.gather(1, labels.cpu()[:, None])[:, 0])
    # CE-U from the outputs: its value lse - mean_without_label and its gradient factor
    # p_y / (1 - p_y) = exp(target - lse_without_label), the latter relative (it is ~e^100 on a +100 row)
    ce_u = lse - mean_wo
    ref_ce_u = ref_lse - ref_mean_wo
    assert torch.all((ce_u - ref_ce_u).abs() <= 2e-5 * (ref_ce_u.abs() + ref_lse.abs() + 1))
    # p_y / (1 - p_y) = exp(l_y - lse_without_label) exactly (the float64 1 - p_y itself is 0 on a
    # +100 row): relative error |error of lse_without_label|
    factor = (target - lse_wo).exp()
    ref_factor = (target - ref_lse_wo).exp()
    assert torch.all((factor / ref_factor - 1).abs() <= 2.0**-20 * (ref_lse_wo.abs() + 1)), (factor, ref_factor)
    # the flat row: every other column equal to 7.25
    for r in range(n):
        if KINDS[r % len(KINDS)] == "flat":
            assert abs(mean_wo[r] - 7.25) <= 1e-6 and abs(lse_wo[r] - 7.25 - math.log(v - 1)) <= 1e-5, r


@pytest.mark.parametrize("v", [2, 33, 257, 1031])
@pytest.mark.parametrize("n", [1, 5, 17])
def test_the_variant_gives_the_default_calls_lse_and_target_bits(n, v):
    # the variant adds its sums beside the plain ones: its lse and target are the same bits
    logits, _, labels = inputs(n, v)
    lse, target = sequence_epilogue.row_statistics(logits, labels)
    lse2, target2, _, _ = sequence_epilogue.row_statistics(logits, labels, without_label=True)
    assert torch.equal(lse, lse2) and torch.equal(target, target2)


@pytest.mark.parametrize("gap", [30.0, 100.0])
def test_subtracting_the_label_from_the_full_sum_cancels_and_the_kernel_does_not(gap):
    # A memorised token: the label 30 (100) nats above the rest, 1 - p_y ~ e^-30 (e^-100), far below
    # fp32's epsilon (2^-23 ~ e^-16). The full sum is 1 + ~e^-30 = 1 in fp32, so S_all - e_y = 0:
    # the naive lse_without_label is -inf (and its mean 0 / 0). The kernel sums the other columns
    # directly, with their own max, and is as accurate as anywhere else.
    n, v = 3, 1031
    logits, exact, labels = inputs(n, v)
    y = int(labels[1])
    row = logits[1].clone()
    others = torch.arange(v, device=row.device) != y
    row[y] = row[others].max() + gap
    logits[1] = row
    exact = logits.double().cpu()
    _, ref_lse_wo, ref_mean_wo = reference(exact, labels)

    # naive, fp32: the full distribution's sums less the label's term
    x = logits[1].cpu()
    m = x.max()
    e = (x - m).exp()
    naive_sum = e.sum() - e[y]
    naive_lse_wo = m + naive_sum.log()
    naive_mean_wo = ((e * x).sum() - e[y] * x[y]) / naive_sum
    naive_err = (naive_lse_wo.double() - ref_lse_wo[1]).abs()
    assert not torch.isfinite(naive_err) or naive_err > 1.0, naive_lse_wo
    assert not torch.isfinite(naive_mean_wo) or (naive_mean_wo.double() - ref_mean_wo[1]).abs() > 1.0

    _, _, lse_wo, mean_wo = sequence_epilogue.row_statistics(logits, labels, without_label=True)
    lse_wo, mean_wo = lse_wo.double().cpu(), mean_wo.double().cpu()
    assert torch.all((lse_wo - ref_lse_wo).abs() <= 2.0**-21 * (ref_lse_wo.abs() + 1)), (lse_wo, ref_lse_wo)
    assert torch.all((mean_wo - ref_mean_wo).abs() <= 1e-5 * (ref_mean_wo.abs() + 1)), (mean_wo, ref_mean_wo)


def test_minus_infinity_logits_and_blocks_without_other_columns():
    # -inf logits (masked vocabulary entries) count for nothing; a 256-wide block whose only finite
    # column is the label, or that holds nothing finite, leaves the other columns' sums as they were;
    # the first finite other column may come late in the row.
    n, v = 4, 1031
    logits = torch.full((n, v), float("-inf"))
    # (The plain lse needs a finite column in the first block, as before the flag: every row has one.)
    labels = torch.tensor([0, 300, 3, 5])
    logits[0, 0], logits[0, 700], logits[0, 1030] = 50.0, 3.0, 4.0  # first block: only the label
    logits[1, 300], logits[1, 1029], logits[1, 1] = 80.0, -2.0, -1.0  # label alone in block 1
    logits[2, 3], logits[2, 1030], logits[2, 1024] = 9.0, 9.0, 9.0  # others only in the last (ragged) block
    logits[3] = torch.randn(v) * 3
    logits[3, 5] = 200.0
    logits[3, 256:768] = float("-inf")  # two whole blocks of -inf between finite ones
    logits = logits.to(TRITON_DEVICE)
    exact = logits.double().cpu()
    ref_lse, ref_lse_wo, ref_mean_wo = reference(exact, labels)
    lse, _, lse_wo, mean_wo = (
        t.double().cpu() for t in sequence_epilogue.row_statistics(logits, labels.to(TRITON_DEVICE), without_label=True)
    )
    assert torch.isfinite(lse_wo).all() and torch.isfinite(mean_wo).all(), (lse_wo, mean_wo)
    assert torch.all((lse - ref_lse).abs() <= 2.0**-21 * (ref_lse.abs() + 1))
    assert torch.all((lse_wo - ref_lse_wo).abs() <= 2.0**-21 * (ref_lse_wo.abs() + 1)), (lse_wo, ref_lse_wo)
    assert torch.all((mean_wo - ref_mean_wo).abs() <= 1e-5 * (ref_mean_wo.abs() + 1)), (mean_wo, ref_mean_wo)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_no_other_column_gives_minus_infinity_and_nan():
    # V == 1 (callers refuse V < 2): no other column, so lse_without_label = log 0 = -inf and
    # mean_without_label = 0 / 0 = NaN, as documented; lse and target as usual.
    logits = torch.randn(3, 1).to(TRITON_DEVICE)
    labels = torch.zeros(3, dtype=torch.int64, device=TRITON_DEVICE)
    lse, target, lse_wo, mean_wo = sequence_epilogue.row_statistics(logits, labels, without_label=True)
    assert torch.equal(lse.cpu(), logits[:, 0].cpu()) and torch.equal(target.cpu(), logits[:, 0].cpu())
    assert torch.all(lse_wo.cpu() == float("-inf")) and torch.isnan(mean_wo.cpu()).all()


def test_no_rows():
    logits = torch.empty(0, 33, device=TRITON_DEVICE)
    labels = torch.empty(0, dtype=torch.int64, device=TRITON_DEVICE)
    out = sequence_epilogue.row_statistics(logits, labels, without_label=True)
    assert len(out) == 4 and all(t.shape == (0,) and t.dtype == torch.float32 for t in out)
    assert len(sequence_epilogue.row_statistics(logits, labels)) == 2
