"""Tests for fastnpo.metrics: hand-computed values on tiny cases, stability, bad inputs."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from fastnpo.tofu.metrics import (
    MODEL_UTILITY_KEYS,
    forget_quality,
    model_utility,
    normalized_probability,
    probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)

LOG = math.log
EXP = math.exp


# --------------------------------------------------------------------------- probability


def test_probability_hand_values():
    # exp(0) = 1, exp(log 0.5) = 0.5, exp(-inf) = 0, exp(-2) = 0.1353...
    out = probability([0.0, LOG(0.5), -math.inf, -2.0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, [1.0, 0.5, 0.0, EXP(-2.0)], rtol=1e-15)


def test_probability_is_exp_of_minus_mean_nll():
    # answer of 4 tokens with NLLs 1, 2, 3, 6 -> token-mean NLL 3 -> p = e^-3
    nll = [1.0, 2.0, 3.0, 6.0]
    assert probability(-sum(nll) / len(nll)) == pytest.approx(EXP(-3.0), rel=1e-15)


def test_probability_scalar_and_2d_and_torch():
    assert isinstance(probability(0.0), float)
    assert probability(LOG(0.25)) == pytest.approx(0.25, rel=1e-15)
    np.testing.assert_allclose(probability([[0.0, LOG(0.5)]]), [[1.0, 0.5]])
    t = torch.tensor([0.0, LOG(0.5)], dtype=torch.bfloat16)
    np.testing.assert_allclose(probability(t), [1.0, 0.5], rtol=1e-2)
    t64 = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(probability(t64), [EXP(-1.0), EXP(-3.0)], rtol=1e-15)


def test_probability_extreme_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = probability([-200.0, -1000.0])
    assert out[0] == pytest.approx(EXP(-200.0), rel=1e-14)
    assert out[1] == 0.0  # underflows to 0 (true value e^-1000), correct in float64


# --------------------------------------------------------------------------- normalized probability


def test_normalized_probability_hand_values():
    true = [LOG(0.5), LOG(0.2)]
    pert = [[LOG(0.25), LOG(0.25)], [LOG(0.1), LOG(0.3)]]
    # 0.5 / (0.5 + 0.25 + 0.25) = 0.5 ; 0.2 / (0.2 + 0.1 + 0.3) = 1/3
    np.testing.assert_allclose(normalized_probability(true, pert), [0.5, 1.0 / 3.0], rtol=1e-14)


def test_normalized_probability_single_perturbed_is_sigmoid():
    # p_t / (p_t + p_f) = 1 / (1 + exp(m_f - m_t)); m_t = -1, m_f = -3 -> 1 / (1 + e^-2)
    out = normalized_probability([-1.0], [[-3.0]])
    assert out[0] == pytest.approx(1.0 / (1.0 + EXP(-2.0)), rel=1e-15)


def test_normalized_probability_extreme_logprobs_stable():
    true = np.array([-200.0, -200.0, -1000.0, -1000.0])
    pert = np.array(
        [
            [-200.0, -200.0],  # three equal -> 1/3
            [-201.0, -1e4],  # 1 / (1 + e^-1 + ~0)
            [-1001.0, -1002.0],  # 1 / (1 + e^-1 + e^-2)
            [-900.0, -1000.0],  # 1 / (2 + e^100) ~= 3.7e-44
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalized_probability(true, pert)
    expected = [
        1.0 / 3.0,
        1.0 / (1.0 + EXP(-1.0)),
        1.0 / (1.0 + EXP(-1.0) + EXP(-2.0)),
        # p_t = e^-1000, p_f = e^-900 + e^-1000: divide by e^-1000 -> 1 / (1 + e^100 + 1)
        1.0 / (2.0 + EXP(100.0)),
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # the naive formula fails here (0/0): make sure the test really exercises the stable path
    with np.errstate(invalid="ignore"):
        naive = np.exp(true[2]) / (np.exp(true[2]) + np.exp(pert[2]).sum())
    assert math.isnan(naive)


def test_normalized_probability_neg_inf_true_is_zero():
    out = normalized_probability([-math.inf, -1.0], [[-1.0, -2.0], [-math.inf, -math.inf]])
    np.testing.assert_allclose(out, [0.0, 1.0])


def test_normalized_probability_all_neg_inf_raises():
    with pytest.raises(ValueError, match="true_mean_logprob"):
        normalized_probability([-math.inf], [[-math.inf, -math.inf]])


def test_normalized_probability_torch_input():
    out = normalized_probability(torch.tensor([LOG(0.5)]), torch.tensor([[LOG(0.25), LOG(0.25)]]))
    np.testing.assert_allclose(out, [0.5], rtol=1e-6)


# --------------------------------------------------------------------------- truth ratio


def test_truth_ratio_hand_values():
    para = [-1.0, -2.0, LOG(0.5)]
    pert = [[-2.0, -4.0], [-1.0, -1.0], [LOG(0.25), LOG(0.0625)]]
    # row 0: mean(-2, -4) - (-1) = -3 + 1 = -2          -> e^-2
    # row 1: mean(-1, -1) - (-2) = -1 + 2 = +1          -> e
    # row 2: geometric mean(0.25, 0.0625) / 0.5 = 0.125 / 0.5 = 0.25
    np.testing.assert_allclose(truth_ratio(para, pert), [EXP(-2.0), EXP(1.0), 0.25], rtol=1e-14)


def test_truth_ratio_is_geometric_mean_over_paraphrased():
    # p(para) = 0.4, p(pert) = 0.1, 0.2, 0.8 -> (0.1*0.2*0.8)^(1/3) / 0.4 = 0.016^(1/3) / 0.4
    r = truth_ratio([LOG(0.4)], [[LOG(0.1), LOG(0.2), LOG(0.8)]])
    assert r[0] == pytest.approx(0.016 ** (1.0 / 3.0) / 0.4, rel=1e-13)


def test_truth_ratio_extreme_logprobs_stable():
    para = [-1000.0, -300.0, -1000.0, -1.0]
    pert = [[-1001.0, -1003.0], [-300.0, -300.0], [0.0, -0.5], [-2000.0, -2000.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = truth_ratio(para, pert)
    # row 0: -1002 + 1000 = -2 ; row 1: 0 ; row 2: -0.25 + 1000 > 709 -> inf ; row 3: -1999 -> 0
    assert r[0] == pytest.approx(EXP(-2.0), rel=1e-13)
    assert r[1] == 1.0
    assert r[2] == math.inf
    assert r[3] == 0.0


def test_truth_ratio_neg_inf():
    r = truth_ratio([-1.0, -math.inf], [[-math.inf, -1.0], [-1.0, -2.0]])
    assert r[0] == 0.0 and r[1] == math.inf
    with pytest.raises(ValueError, match="paraphrased_mean_logprob"):
        truth_ratio([-math.inf], [[-math.inf, -1.0]])


def test_truth_ratio_score_hand_values():
    # R = e^-2, e, 0.25 -> max(0, 1-R) = 1 - e^-2, 0, 0.75 -> mean
    expected = (1.0 - EXP(-2.0) + 0.0 + 0.75) / 3.0
    assert truth_ratio_score([EXP(-2.0), EXP(1.0), 0.25]) == pytest.approx(expected, rel=1e-15)
    assert truth_ratio_score([0.0, 1.0, math.inf]) == pytest.approx(1.0 / 3.0, rel=1e-15)
    assert truth_ratio_score([0.5]) == 0.5
    assert isinstance(truth_ratio_score([0.5]), float)


def test_truth_ratio_score_end_to_end():
    r = truth_ratio([-1.0, -2.0], [[-2.0, -4.0], [-1.0, -1.0]])  # e^-2, e
    assert truth_ratio_score(r) == pytest.approx((1.0 - EXP(-2.0)) / 2.0, rel=1e-14)


# --------------------------------------------------------------------------- forget quality


def _exact_ks_pvalue(a, b):
    """Exact two-sided KS p-value by enumerating every split of the pooled ranks (no ties).

    Under H0 every assignment of the pooled order statistics to the two samples is equally
    likely; p = #{assignments with D >= D_obs} / C(n1 + n2, n1). Uses exact fractions.
    """
    n1, n2 = len(a), len(b)
    pooled = sorted(list(a) + list(b))
    assert len(set(pooled)) == n1 + n2, "no ties"

    def d_stat(is_a):
        ca = cb = 0
        best = Fraction(0)
        for flag in is_a:
            if flag:
                ca += 1
            else:
                cb += 1
            best = max(best, abs(Fraction(ca, n1) - Fraction(cb, n2)))
        return best

    d_obs = d_stat([x in set(a) for x in pooled])
    count = total = 0
    for pos in itertools.combinations(range(n1 + n2), n1):
        chosen = set(pos)
        total += 1
        count += d_stat([i in chosen for i in range(n1 + n2)]) >= d_obs
    assert total == math.comb(n1 + n2, n1)
    return Fraction(count, total)


def test_forget_quality_hand_enumerated_complete_separation():
    # 3 vs 3, fully separated: D = 1, reached only by AAABBB and BBBAAA -> p = 2 / C(6,3) = 2/20
    assert forget_quality([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx(0.1, rel=1e-12)


def test_forget_quality_hand_enumerated_interleaved():
    # pooled order A A B A B B: prefix |#A - #B| peaks at 2 -> D = 2/3.
    # Of the C(6,3) = 20 orders, those with max prefix |#A-#B| <= 1 are the 2^3 = 8 built
    # from the pairs AB / BA, so P(D >= 2/3) = 12/20 = 0.6.
    assert forget_quality([1.0, 2.0, 4.0], [3.0, 5.0, 6.0]) == pytest.approx(0.6, rel=1e-12)


def test_forget_quality_identical_distribution_is_one():
    r = [0.2, 0.5, 0.9, 1.3]
    assert forget_quality(r, r) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "a, b",
    [
        ([0.11, 0.52, 0.93], [0.35, 0.74, 1.2, 2.5]),
        ([0.3, 1.7, 0.05, 2.2], [0.6, 0.9, 1.1, 1.4, 3.0]),
        ([5.0, 0.1, 0.2], [0.3, 0.4, 0.5, 0.6]),
    ],
)
def test_forget_quality_matches_exact_enumeration(a, b):
    expected = float(_exact_ks_pvalue(a, b))
    assert forget_quality(a, b) == pytest.approx(expected, rel=1e-9)


def test_forget_quality_invariant_to_tofu_transforms():
    # locuslab/tofu feeds 1/R, open-unlearning feeds R (and 1/(R+1e-10)); log R is also monotone.
    rng = np.random.default_rng(0)
    a = np.exp(rng.normal(0.0, 1.0, size=40))
    b = np.exp(rng.normal(0.4, 1.2, size=60))
    p = forget_quality(a, b)
    assert 0.0 < p < 1.0
    assert forget_quality(1.0 / a, 1.0 / b) == pytest.approx(p, rel=1e-12)
    la, lb = np.log(a), np.log(b)
    shift = -min(la.min(), lb.min())  # make non-negative, same shift for both -> monotone map
    assert forget_quality(la + shift, lb + shift) == pytest.approx(p, rel=1e-12)


def test_forget_quality_end_to_end_from_logprobs():
    # unlearned: R = e^-2, e^-1, e^0 ; retain: R = e^1, e^2, e^3 -> fully separated -> 0.1
    unl = truth_ratio([-1.0, -1.0, -1.0], [[-3.0], [-2.0], [-1.0]])
    ret = truth_ratio([-1.0, -1.0, -1.0], [[0.0], [1.0], [2.0]])
    assert forget_quality(unl, ret) == pytest.approx(0.1, rel=1e-12)


def test_forget_quality_returns_float_and_accepts_torch():
    p = forget_quality(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6]))
    assert isinstance(p, float)
    assert p == pytest.approx(0.1, rel=1e-9)


# --------------------------------------------------------------------------- ROUGE-L recall


def test_rouge_l_recall_hand_lcs():
    preds = [
        "the cat on a mat",  # LCS with ref: the cat on mat = 4 of 6 ref tokens
        "paris is in france europe",  # LCS: paris france = 2 of 2
        "delta gamma beta alpha",  # reversed: LCS 1 of 4
        "",  # empty prediction: 0
        "The Cat Sat On The Mat!",  # case / punctuation ignored: 6 of 6
    ]
    refs = [
        "the cat sat on the mat",
        "Paris, France",
        "alpha beta gamma delta",
        "anything at all",
        "the cat sat on the mat",
    ]
    out = rouge_l_recall(preds, refs)
    assert isinstance(out, list) and all(isinstance(x, float) for x in out)
    assert out == pytest.approx([4 / 6, 2 / 2, 1 / 4, 0.0, 1.0], rel=1e-12)


def test_rouge_l_recall_is_recall_not_precision():
    # recall divides by the reference length: ref 2 tokens all matched -> 1.0;
    # swapping the roles would give 2/5
    assert rouge_l_recall(["paris is in france europe"], ["paris france"]) == [1.0]
    assert rouge_l_recall(["paris france"], ["paris is in france europe"]) == pytest.approx([2 / 5])


def test_rouge_l_recall_uses_porter_stemmer_like_tofu():
    # stemmed ref: the cat were run ; stemmed pred: the cat run -> LCS 3 of 4
    # (without stemming only "the" matches -> 1/4)
    out = rouge_l_recall(["the cat runs"], ["The cats were running"])
    assert out == pytest.approx([3 / 4])
    no_stem = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert no_stem.score("The cats were running", "the cat runs")["rougeL"].recall == pytest.approx(1 / 4)


def test_rouge_l_recall_accepts_tuples():
    assert rouge_l_recall(("a b c",), ("a c",)) == [1.0]
    assert rouge_l_recall(np.array(["a b c"]), ["a c"]) == [1.0]


# --------------------------------------------------------------------------- model utility


def _mu_values(default=0.5, **overrides):
    vals = {k: default for k in MODEL_UTILITY_KEYS}
    vals.update({k.replace("__", "/"): v for k, v in overrides.items()})
    return vals


def test_model_utility_keys():
    assert len(MODEL_UTILITY_KEYS) == 9 == len(set(MODEL_UTILITY_KEYS))
    assert set(MODEL_UTILITY_KEYS) == {
        f"{s}/{m}"
        for s in ("retain", "real_authors", "world_facts")
        for m in ("probability", "rouge", "truth_ratio")
    }


def test_model_utility_hand_values():
    assert model_utility(_mu_values(0.5)) == pytest.approx(0.5, rel=1e-14)
    # six 1.0 and three 0.25: 9 / (6 * 1 + 3 * 4) = 9 / 18 = 0.5
    vals = _mu_values(1.0, retain__rouge=0.25, real_authors__probability=0.25, world_facts__truth_ratio=0.25)
    assert model_utility(vals) == pytest.approx(0.5, rel=1e-14)
    # eight 0.5 and one 0.1: 9 / (8 * 2 + 10) = 9 / 26
    assert model_utility(_mu_values(0.5, retain__probability=0.1)) == pytest.approx(9 / 26, rel=1e-14)


def test_model_utility_zero_gives_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_utility(_mu_values(0.7, world_facts__rouge=0.0)) == 0.0


def test_model_utility_accepts_numpy_and_torch_scalars():
    vals = {k: np.float32(0.5) for k in MODEL_UTILITY_KEYS}
    vals["retain/rouge"] = torch.tensor(0.5)
    out = model_utility(vals)
    assert isinstance(out, float) and out == pytest.approx(0.5)


def test_model_utility_missing_key():
    vals = _mu_values()
    del vals["real_authors/truth_ratio"]
    with pytest.raises(ValueError, match="real_authors/truth_ratio"):
        model_utility(vals)


def test_model_utility_extra_key():
    vals = _mu_values()
    vals["forget/rouge"] = 0.1
    with pytest.raises(ValueError, match="forget/rouge"):
        model_utility(vals)


@pytest.mark.parametrize("bad", [-0.1, math.nan, 1.5, math.inf])
def test_model_utility_bad_value(bad):
    with pytest.raises(ValueError, match="world_facts/probability"):
        model_utility(_mu_values(world_facts__probability=bad))


def test_model_utility_not_mapping():
    with pytest.raises(ValueError, match="values"):
        model_utility([0.5] * 9)


# --------------------------------------------------------------------------- bad inputs


NAN = math.nan


@pytest.mark.parametrize(
    "fn, args, name",
    [
        # probability
        (probability, ([],), "mean_logprob"),
        (probability, ([0.0, NAN],), "mean_logprob"),
        (probability, ([math.inf],), "mean_logprob"),
        (probability, (["a"],), "mean_logprob"),
        (probability, ("abc",), "mean_logprob"),
        # normalized_probability
        (normalized_probability, ([], [[]]), "true_mean_logprob"),
        (normalized_probability, ([[-1.0]], [[-1.0]]), "true_mean_logprob"),
        (normalized_probability, ([-1.0], [-1.0]), "perturbed_mean_logprobs"),
        (normalized_probability, ([-1.0], [[]]), "perturbed_mean_logprobs"),
        (normalized_probability, ([-1.0, -2.0], [[-1.0]]), "perturbed_mean_logprobs"),
        (normalized_probability, ([NAN], [[-1.0]]), "true_mean_logprob"),
        (normalized_probability, ([-1.0], [[NAN]]), "perturbed_mean_logprobs"),
        # truth_ratio
        (truth_ratio, ([], [[-1.0]]), "paraphrased_mean_logprob"),
        (truth_ratio, (-1.0, [[-1.0]]), "paraphrased_mean_logprob"),
        (truth_ratio, ([-1.0], [[[-1.0]]]), "perturbed_mean_logprobs"),
        (truth_ratio, ([-1.0], [[-1.0], [-2.0]]), "perturbed_mean_logprobs"),
        (truth_ratio, ([NAN], [[-1.0]]), "paraphrased_mean_logprob"),
        (truth_ratio, ([-1.0], [[math.inf]]), "perturbed_mean_logprobs"),
        # truth_ratio_score
        (truth_ratio_score, ([],), "ratios"),
        (truth_ratio_score, ([0.5, NAN],), "ratios"),
        (truth_ratio_score, ([-0.5],), "ratios"),
        (truth_ratio_score, ([[0.5]],), "ratios"),
        (truth_ratio_score, ([NAN],), "ratios"),
        (truth_ratio_score, ([-1.0],), "ratios"),
        # forget_quality
        (forget_quality, ([], [0.5]), "unlearned_ratios"),
        (forget_quality, ([0.5], []), "retain_ratios"),
        (forget_quality, ([NAN], [0.5]), "unlearned_ratios"),
        (forget_quality, ([0.5], [-0.5]), "retain_ratios"),
        (forget_quality, ([[0.5]], [0.5]), "unlearned_ratios"),
        # rouge_l_recall
        (rouge_l_recall, ([], []), "predictions"),
        (rouge_l_recall, (["a"], []), "references"),
        (rouge_l_recall, (["a", "b"], ["a"]), "predictions"),
        (rouge_l_recall, ("a b", ["a"]), "predictions"),
        (rouge_l_recall, (["a"], "a"), "references"),
        (rouge_l_recall, (["a", 3], ["a", "b"]), r"predictions\[1\]"),
        (rouge_l_recall, (["a"], [None]), r"references\[0\]"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_type_errors_are_also_value_errors():
    from fastnpo.tofu.metrics import MetricInputTypeError

    assert issubclass(MetricInputTypeError, ValueError) and issubclass(MetricInputTypeError, TypeError)
    with pytest.raises(TypeError, match="predictions"):
        rouge_l_recall("a b", ["a"])
