"""TOFU-style evaluation metrics as pure functions (no model code).

Inputs are per-example numbers (Python sequences, numpy arrays or torch tensors of any
float dtype / device); they are converted to float64 numpy arrays before any arithmetic.
Outputs are Python floats or float64 numpy arrays.

Conventions (the TOFU paper and its reference code):

* A *mean log-prob* is the token-mean log-probability of an answer given its prompt,
  ``m = (1/|y|) sum_t log pi(y_t | x, y_<t)`` = ``-(token-mean NLL)``. Every probability
  below is this per-token normalised one, ``p = exp(m)``.
* ``n`` = number of examples, ``k`` = number of perturbed (wrong) answers per example.

The well-kept library routines are used rather than re-implemented: ``scipy.stats.ks_2samp``
(forget quality), ``scipy.stats.hmean`` (model utility), ``scipy.special.logsumexp``
(normalised probability) and ``rouge_score.rouge_scorer`` (ROUGE-L recall).

Reference implementations consulted for conventions (no code copied): ``locuslab/tofu``
(``aggregate_eval_stat.py``, ``evaluate_util.py``) and ``locuslab/open-unlearning``
(``src/evals/metrics/memorization.py``, ``privacy.py``, ``utils.py``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from scipy.special import logsumexp
from scipy.stats import hmean, ks_2samp

__all__ = [
    "MODEL_UTILITY_KEYS",
    "MODEL_UTILITY_METRICS",
    "MODEL_UTILITY_SPLITS",
    "MetricInputTypeError",
    "forget_quality",
    "forget_truth_ratio_score",
    "model_utility",
    "normalized_probability",
    "probability",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_score",
]

#: The three evaluation sets that enter model utility.
MODEL_UTILITY_SPLITS: tuple[str, ...] = ("retain", "real_authors", "world_facts")
#: The three per-set metrics that enter model utility.
MODEL_UTILITY_METRICS: tuple[str, ...] = ("probability", "rouge", "truth_ratio")
#: Exactly the nine keys :func:`model_utility` requires, ``"<split>/<metric>"``.
MODEL_UTILITY_KEYS: tuple[str, ...] = tuple(
    f"{split}/{metric}" for split in MODEL_UTILITY_SPLITS for metric in MODEL_UTILITY_METRICS
)


# --------------------------------------------------------------------------- input checks


class MetricInputTypeError(ValueError, TypeError):
    """Bad input of the wrong type (e.g. a bare string where a sequence is expected).

    Subclasses ``ValueError`` so that every bad-input error of this module can be caught as
    ``ValueError``, and ``TypeError`` because the problem is the argument's type.
    """


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert ``x`` (sequence / ndarray / torch tensor / scalar) to a float64 ndarray."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    if isinstance(x, (str, bytes)):
        raise MetricInputTypeError(f"{name} must be numeric, got a {type(x).__name__}")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric (array-like of floats): {exc}") from exc
    return arr


def _check_array(
    x: Any,
    name: str,
    *,
    ndim: int | None = None,
    allow_neg_inf: bool = False,
    allow_pos_inf: bool = False,
    nonnegative: bool = False,
) -> np.ndarray:
    """Convert and validate: ndim, non-empty, no NaN, infinities/negatives as allowed."""
    arr = _to_numpy(x, name)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)} ({arr.ndim}-D)")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if not allow_pos_inf and np.isposinf(arr).any():
        raise ValueError(f"{name} contains +inf")
    if not allow_neg_inf and np.isneginf(arr).any():
        raise ValueError(f"{name} contains -inf")
    if nonnegative and (arr < 0).any():
        raise ValueError(f"{name} must be non-negative, got min {arr.min()!r}")
    return arr


def _check_true_vs_perturbed(
    true: Any, true_name: str, perturbed: Any, perturbed_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ``[n]`` mean-log-prob vector against a ``[n, k]`` perturbed matrix."""
    t = _check_array(true, true_name, ndim=1, allow_neg_inf=True)
    p = _check_array(perturbed, perturbed_name, ndim=2, allow_neg_inf=True)
    if p.shape[0] != t.shape[0]:
        raise ValueError(
            f"{perturbed_name} has {p.shape[0]} rows but {true_name} has {t.shape[0]} examples "
            f"({perturbed_name} must be [n_examples, n_perturbed])"
        )
    return t, p


# --------------------------------------------------------------------------- probability


def probability(mean_logprob: Any) -> np.ndarray | float:
    """Per-token normalised answer probability, elementwise.

    ``p = exp(m)`` where ``m = (1/|y|) sum_t log pi(y_t | x, y_<t)`` is the token-mean
    log-prob of the answer, i.e. ``p = exp(-token-mean NLL)`` (TOFU "Probability" on the
    retain / forget sets; the reported number is the mean of ``p`` over examples).

    Args:
        mean_logprob: token-mean log-probs, any shape (a scalar gives a float). ``-inf``
            is allowed (p = 0); NaN and ``+inf`` are rejected. Values are expected to be
            ``<= 0`` (this is not enforced).

    Returns:
        ``exp(mean_logprob)`` as a float64 array of the same shape, or a float for a scalar.
    """
    m = _check_array(mean_logprob, "mean_logprob", allow_neg_inf=True)
    p = np.exp(m)
    return float(p) if p.ndim == 0 else p


def normalized_probability(true_mean_logprob: Any, perturbed_mean_logprobs: Any) -> np.ndarray:
    """Probability of the true answer normalised over the true + perturbed answers.

    Per example ``i`` with true answer ``a`` and perturbed answers ``b_1..b_k``::

        P_i = p(a) / (p(a) + sum_j p(b_j)),    p(.) = exp(token-mean log-prob)

    (TOFU "Probability" on the real-authors and world-facts sets.) Computed in log space,
    ``P_i = exp(m_a - logsumexp([m_a, m_b1, ..., m_bk]))``, so it stays exact when every
    ``p`` underflows (mean log-probs like -200 or -1000).

    Args:
        true_mean_logprob: ``[n]`` token-mean log-probs of the true answers.
        perturbed_mean_logprobs: ``[n, k]`` token-mean log-probs of the perturbed answers.

    Returns:
        ``[n]`` float64 array in ``[0, 1]``.
    """
    t, p = _check_true_vs_perturbed(
        true_mean_logprob, "true_mean_logprob", perturbed_mean_logprobs, "perturbed_mean_logprobs"
    )
    all_m = np.concatenate([t[:, None], p], axis=1)
    with np.errstate(invalid="ignore"):
        log_den = logsumexp(all_m, axis=1)
        log_ratio = t - log_den
    bad = np.isnan(log_ratio)
    if bad.any():
        raise ValueError(
            "normalized_probability is undefined where true_mean_logprob and all "
            f"perturbed_mean_logprobs are -inf (examples {np.flatnonzero(bad).tolist()})"
        )
    return np.exp(log_ratio)


# --------------------------------------------------------------------------- truth ratio


def truth_ratio(paraphrased_mean_logprob: Any, perturbed_mean_logprobs: Any) -> np.ndarray:
    """TOFU truth ratio per example.

    ::

        R_i = (prod_j p(b_j))^(1/k) / p(a~) = exp( mean_j m(b_j) - m(a~) )

    with ``a~`` the paraphrased answer, ``b_1..b_k`` the perturbed answers, and every
    ``p = exp(m)`` per-token normalised (the inputs are already token-mean log-probs), i.e.
    the geometric mean of the perturbed probabilities over the paraphrased probability.
    ``R < 1``: the model prefers the (paraphrased) truth. Evaluated as one ``exp`` of a
    difference, so extreme log-probs are fine; ``R`` saturates to ``inf`` only when the
    log-ratio exceeds ~709.

    Args:
        paraphrased_mean_logprob: ``[n]`` token-mean log-probs of the paraphrased answers.
        perturbed_mean_logprobs: ``[n, k]`` token-mean log-probs of the perturbed answers.

    Returns:
        ``[n]`` float64 array of ratios in ``[0, inf]``.
    """
    para, pert = _check_true_vs_perturbed(
        paraphrased_mean_logprob,
        "paraphrased_mean_logprob",
        perturbed_mean_logprobs,
        "perturbed_mean_logprobs",
    )
    with np.errstate(invalid="ignore"):
        log_r = pert.mean(axis=1) - para
    bad = np.isnan(log_r)
    if bad.any():
        raise ValueError(
            "truth_ratio is undefined where paraphrased_mean_logprob and the mean of "
            f"perturbed_mean_logprobs are both -inf (examples {np.flatnonzero(bad).tolist()})"
        )
    with np.errstate(over="ignore"):
        return np.exp(log_r)


def _check_ratios(ratios: Any, name: str) -> np.ndarray:
    return _check_array(ratios, name, ndim=1, allow_pos_inf=True, nonnegative=True)


def truth_ratio_score(ratios: Any) -> float:
    """Truth-ratio score for model utility (retain / real authors / world facts).

    ::

        score = (1/n) sum_i max(0, 1 - R_i)

    Higher is better: 1 when the model puts all weight on the truth (R = 0), 0 when it
    prefers the perturbed answers at least as much (R >= 1).

    Args:
        ratios: ``[n]`` truth ratios ``R`` from :func:`truth_ratio` (``>= 0``, ``inf`` allowed).

    Returns:
        The score as a float in ``[0, 1]``.
    """
    r = _check_ratios(ratios, "ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_truth_ratio_score(ratios: Any) -> float:
    """The forget set's truth ratio as TOFU reports it (aggregate_eval_stat.py; open-unlearning's
    forget_Truth_Ratio, "closer to 1 is better")::

        score = (1/n) sum_i min(R_i, 1 / R_i)

    1 when the model cannot tell the truth from the perturbations (R = 1, what a model that never
    saw the forget set does), towards 0 when it strongly prefers either side.

    Args:
        ratios: ``[n]`` truth ratios ``R`` from :func:`truth_ratio` (``>= 0``, ``inf`` allowed).
    """
    r = _check_ratios(ratios, "ratios")
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(r, 1.0 / r)))


def forget_quality(unlearned_ratios: Any, retain_ratios: Any) -> float:
    """Forget quality: p-value of the two-sample KS test on forget-set truth ratios.

    ::

        D = sup_t |F_unlearned(t) - F_retain(t)|,   forget_quality = P(D' >= D | H0)

    where ``F`` are the empirical CDFs of the truth ratios ``R`` for the unlearned model and for
    the retain model (trained without the forget set), on the same forget-set questions.
    Computed with ``scipy.stats.ks_2samp`` using its defaults (two-sided, ``method="auto"``:
    exact distribution for samples up to 10000, asymptotic beyond), as in the TOFU and
    open-unlearning code. Higher is better; > 0.05 is read as meaningful forgetting.

    The test is fed ``R`` itself (UNLEARNING.md; ``locuslab/open-unlearning``'s
    ``privacy.forget_quality``), where ``locuslab/tofu`` feeds ``1/R`` and open-unlearning's
    ``utils.get_forget_quality`` ``1/(R + 1e-10)``: the same statistic and p-value, since the
    KS statistic is invariant under a strictly monotone map applied to both samples (the tests
    check this against ``1/R`` and ``log R``).

    Args:
        unlearned_ratios: ``[n1]`` truth ratios of the unlearned model on the forget set.
        retain_ratios: ``[n2]`` truth ratios of the retain model on the forget set
            (``n1 == n2`` in TOFU, but not required by the test).

    Returns:
        The p-value as a float in ``[0, 1]``.
    """
    a = _check_ratios(unlearned_ratios, "unlearned_ratios")
    b = _check_ratios(retain_ratios, "retain_ratios")
    return float(ks_2samp(a, b).pvalue)


# --------------------------------------------------------------------------- ROUGE


_ROUGE_L_SCORER: rouge_scorer.RougeScorer | None = None


def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    global _ROUGE_L_SCORER
    if _ROUGE_L_SCORER is None:
        _ROUGE_L_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_L_SCORER


def _check_strings(x: Any, name: str) -> list[str]:
    if isinstance(x, np.ndarray) and x.ndim == 1:
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise MetricInputTypeError(f"{name} must be a sequence of strings, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, s in enumerate(x):
        if not isinstance(s, str):
            raise MetricInputTypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return list(x)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L recall of generated answers against the reference answers.

    ::

        recall_i = LCS(pred_i, ref_i) / |ref_i|

    counted in tokens after ``rouge_score``'s default tokenisation (lower-case, runs of
    non-alphanumerics split tokens) and Porter stemming (words longer than 3 characters).
    Computed with ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` and
    ``scorer.score(target=reference, prediction=prediction).recall``: the stemmer setting and
    argument order match the TOFU code (``evaluate_util.eval_rouge_recall``:
    ``RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)`` then ``scorer.score(gt, gen)``)
    and open-unlearning (``eval_rouge_recall_batch``, ``use_stemmer=True``). An empty
    reference scores 0.

    Args:
        predictions: ``n`` generated (greedy) answers.
        references: ``n`` ground-truth answers.

    Returns:
        List of ``n`` floats in ``[0, 1]``.
    """
    preds = _check_strings(predictions, "predictions")
    refs = _check_strings(references, "references")
    if len(preds) != len(refs):
        raise ValueError(
            f"predictions has {len(preds)} items but references has {len(refs)}; they must match"
        )
    scorer = _rouge_l_scorer()
    return [float(scorer.score(ref, pred)["rougeL"].recall) for pred, ref in zip(preds, refs, strict=True)]


# --------------------------------------------------------------------------- model utility


def model_utility(values: Mapping[str, float]) -> float:
    """TOFU model utility: harmonic mean of nine numbers.

    ::

        MU = 9 / sum_{s, q} (1 / v[s/q]),   s in {retain, real_authors, world_facts},
                                             q in {probability, rouge, truth_ratio}

    computed with ``scipy.stats.hmean``; ``MU = 0`` if any value is 0. The nine values are
    the set-level means: ``probability`` (mean :func:`probability` on retain, mean
    :func:`normalized_probability` on real authors / world facts), ``rouge`` (mean
    :func:`rouge_l_recall` of the greedy answers) and ``truth_ratio``
    (:func:`truth_ratio_score`). Each lies in ``[0, 1]``.

    Args:
        values: mapping with exactly the keys :data:`MODEL_UTILITY_KEYS`
            (``"retain/probability"``, ``"retain/rouge"``, ``"retain/truth_ratio"``,
            ``"real_authors/..."``, ``"world_facts/..."``), each a finite number in ``[0, 1]``.

    Returns:
        The harmonic mean as a float in ``[0, 1]``.
    """
    if not isinstance(values, Mapping):
        raise MetricInputTypeError(
            f"values must be a mapping of the nine model-utility numbers, got {type(values).__name__}"
        )
    missing = [k for k in MODEL_UTILITY_KEYS if k not in values]
    if missing:
        raise ValueError(f"values is missing key(s) {missing}; required keys: {list(MODEL_UTILITY_KEYS)}")
    extra = [k for k in values if k not in MODEL_UTILITY_KEYS]
    if extra:
        raise ValueError(f"values has unexpected key(s) {extra}; required keys: {list(MODEL_UTILITY_KEYS)}")
    nums = []
    for key in MODEL_UTILITY_KEYS:
        arr = _to_numpy(values[key], f"values[{key!r}]")
        if arr.size != 1:
            raise ValueError(f"values[{key!r}] must be a single number, got shape {tuple(arr.shape)}")
        v = float(arr.reshape(()))
        if math.isnan(v):
            raise ValueError(f"values[{key!r}] is NaN")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"values[{key!r}] must be in [0, 1], got {v!r}")
        nums.append(v)
    if min(nums) == 0.0:
        return 0.0
    return float(hmean(nums))
