"""Privacy and memorization metrics as open-unlearning defines them: membership-inference attacks
(LOSS, ZLib, Min-K%, Min-K%++, reference-based, gradient norm), their AUC on forget vs holdout,
privleak, exact memorization and extraction strength.

Only the metric math lives here: every function takes per-example arrays (the answer tokens'
log-probs, the vocabulary mean / second moment of log p, whether each label is the argmax; from
fastnpo.ops.token_statistics) or per-example numbers, never a model. evaluate.py runs the model.

Conventions, all open-unlearning's (src/evals/metrics/mia/*.py, memorization.py, privacy.py; see
docs/evaluation.md):

* An example's arrays cover every answer token in order, the last one being the end-of-answer token
  (EOS). LOSS, ZLib and the reference attack use the token-mean NLL over all of them; Min-K%,
  Min-K%++, gradient norm, exact memorization and extraction strength drop the last position
  (open-unlearning's token-wise helpers exclude "the eos prediction").
* Attack scores are signed like a loss: higher = less likely a member. AUC labels forget 0 and
  holdout 1, so AUC near 1 means the forget set looks much more "member" than the holdout.
* Min-K% and Min-K%++ use k = 0.4 (open-unlearning's TOFU and MUSE configs; its class default is 0.2).
* privleak = ((1 - AUC) - (1 - AUC_retain)) / ((1 - AUC_retain) + 1e-10) * 100 with the Min-K% AUC;
  AUC_retain defaults to 0.5 with a warning when no retain model's evaluation is given.
* Extraction strength keeps open-unlearning's loop exactly: k runs over 0..L-1 and stops at the
  first suffix that the argmax reproduces; when none does, k ends at L-1, so the score is 1/L, not 0.
  An example with no target token scores 0. Exact memorization skips such examples.
"""

import math
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

# open-unlearning's metric names; "mia_*" are the attacks.
ATTACKS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm")
MIN_K = 0.4  # configs/eval/tofu_metrics/mia_min_k*.yaml
PRIVLEAK_ATTACK = "mia_min_k"  # configs/eval/tofu_metrics/privleak.yaml pre-computes it
DEFAULT_RETAIN_AUC = 0.5  # privleak.yaml ref_value
SIGMA_FLOOR = 1e-6  # Min-K%++: variance clamped from below


def _array(values, name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or inf")
    return out


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    return float(k)


def _bottom_k_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:count]))


# ------------------------------------------------------------------------------ per-example scores


def loss_score(logprobs) -> float:
    """LOSS attack: the token-mean NLL of the answer (all answer tokens)."""
    lp = _array(logprobs, "logprobs")
    if lp.size == 0:
        raise ValueError("logprobs is empty: an example needs at least one answer token")
    return float(-lp.mean())


def zlib_score(logprobs, text: str) -> float:
    """ZLib attack: LOSS divided by the zlib-compressed byte length of the answer text (the answer
    tokens decoded without special tokens)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logprobs, k: float = MIN_K) -> float:
    """Min-K% attack: minus the mean of the lowest k fraction of the token log-probs (last token
    dropped; at least one token; 0 for an example with none left)."""
    k = _check_k(k)
    lp = _array(logprobs, "logprobs")[:-1]
    return 0.0 if lp.size == 0 else -_bottom_k_mean(lp, k)


def min_k_plus_plus_score(logprobs, mean, second_moment, k: float = MIN_K, *, variance=None) -> float:
    """Min-K%++ attack: tokens standardised by the model's own distribution,
    (log p(label) - mu) / sigma with mu = sum_v p_v log p_v and sigma^2 = sum_v p_v (log p_v)^2 - mu^2
    (clamped at 1e-6), then minus the mean of the lowest k fraction (last token dropped).
    variance: sigma^2 computed elsewhere (token_statistics' stable one), used instead of the difference."""
    k = _check_k(k)
    lp, mu = _array(logprobs, "logprobs"), _array(mean, "mean")
    second = _array(second_moment, "second_moment")
    var = second - mu * mu if variance is None else _array(variance, "variance")
    if not lp.shape == mu.shape == second.shape == var.shape:
        raise ValueError(
            f"logprobs, mean, second_moment (and variance) must have one length, got {lp.size}, {mu.size}, "
            f"{second.size}, {var.size}"
        )
    lp, mu, var = lp[:-1], mu[:-1], var[:-1]
    if lp.size == 0:
        return 0.0
    sigma = np.sqrt(np.maximum(var, SIGMA_FLOOR))
    return -_bottom_k_mean((lp - mu) / sigma, k)


def reference_score(loss: float, reference_loss: float) -> float:
    """Reference-based attack: the model's LOSS minus a reference model's LOSS on the same example
    (the reference's per-example losses come from its own evaluation: no second model in memory)."""
    return float(loss) - float(reference_loss)


def gradnorm_score(parameter_norms) -> float:
    """Gradient-norm attack: the mean over the parameters of the p-norm of each parameter's gradient
    of the example's token-mean NLL (last token dropped); evaluate.py computes the norms."""
    norms = _array(parameter_norms, "parameter_norms")
    if norms.size == 0:
        raise ValueError("parameter_norms is empty: no parameter received a gradient")
    return float(norms.mean())


def exact_memorization(is_argmax) -> float | None:
    """Fraction of the answer tokens (last dropped) whose label is the model's argmax; None without one."""
    hits = np.asarray(is_argmax, dtype=bool).reshape(-1)[:-1]
    return None if hits.size == 0 else float(hits.mean())


def extraction_strength(is_argmax) -> float:
    """1 - k/L for the smallest k whose suffix [k:] the argmax reproduces exactly (last token dropped,
    L tokens left); open-unlearning's loop leaves k = L-1 when no suffix matches (score 1/L), and an
    example with L = 0 scores 0."""
    hits = np.asarray(is_argmax, dtype=bool).reshape(-1)[:-1]
    length = hits.size
    if length == 0:
        return 0.0
    # all_from[k]: every position k..L-1 is the argmax.
    all_from = np.logical_and.accumulate(hits[::-1])[::-1]
    matching = np.flatnonzero(all_from)
    k = int(matching[0]) if matching.size else length - 1
    return 1.0 - k / length


# ------------------------------------------------------------------------------ aggregates


def auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """Area under the ROC curve with forget labelled 0 and holdout 1 (sklearn's roc_auc_score on the
    scores): P(holdout score > forget score) + P(equal) / 2, from average ranks."""
    forget, holdout = _array(forget_scores, "forget_scores"), _array(holdout_scores, "holdout_scores")
    if forget.size == 0 or holdout.size == 0:
        raise ValueError(f"AUC needs scores on both sets, got {forget.size} forget and {holdout.size} holdout")
    ranks = rankdata(np.concatenate([forget, holdout]))
    holdout_ranks = ranks[forget.size :].sum()
    return float((holdout_ranks - holdout.size * (holdout.size + 1) / 2) / (forget.size * holdout.size))


def privleak(attack_auc: float, retain_auc: float | None = None) -> float:
    """Relative difference, in percent, of 1 - AUC against the retain model's 1 - AUC (0 = as private
    as a model that never saw the forget set; negative = the forget set looks like training data).
    retain_auc None: open-unlearning's default 0.5, with a warning."""
    if retain_auc is None:
        warnings.warn(
            "privleak: no retain model evaluation given (--retain-stats); using the default retain AUC "
            f"of {DEFAULT_RETAIN_AUC}",
            stacklevel=2,
        )
        retain_auc = DEFAULT_RETAIN_AUC
    for name, value in (("attack_auc", attack_auc), ("retain_auc", retain_auc)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    score, ref = 1.0 - attack_auc, 1.0 - retain_auc
    return (score - ref) / (ref + 1e-10) * 100.0


def mean_ignoring_none(values: Sequence[float | None]) -> float:
    """Mean of the values that are not None (open-unlearning drops None scores); NaN if none is left."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else math.nan
