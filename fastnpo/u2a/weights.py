"""The example weights on the scaled simplex: the mirror-descent step and the top-k selection.

Sign of every update (derived, not copied)
-----------------------------------------
One unrolled inner step with step size a > 0: theta'(w) = theta - a sum_i w_i grad l_i(theta).
By the chain rule dJ(theta')/dw_i = <grad J(theta'), d theta'/dw_i> = -a <grad J(theta'), grad l_i>,
and with the Hessian of the inner problem taken as identity (a small step, theta' ~ theta)
dJ/dw_i ~ -a s_i with the SCORE s_i = <grad J(theta), grad l_i(theta)>. So:

* s_i > 0 (unlearning i moves theta along -grad J): raising w_i LOWERS J; s_i < 0 raises it.
* Top-k selection keeps the k LARGEST scores (the most J-lowering per unit weight).
* Mirror descent with the negative-entropy mirror map minimises J by
  w_i <- w_i exp(-eta' dJ/dw_i) = w_i exp(+eta' a s_i), then renormalise to the scaled simplex.
  We use w_i <- w_i exp(+eta s_hat_i), s_hat = s / max|s| (a scale-free eta: the largest
  log-weight change per outer iteration; a and the score scale are absorbed). The authors'
  code selects the largest scores but multiplies by exp(-eta score): within the selection it
  down-weights exactly the examples it selected for being most useful (tests/u2a/test_u2a.py
  shows that the flipped sign makes J go up on a problem with a known answer).
* Optional sparsity: minimise J + lam * H(w / total) (H the entropy, low for sparse w).
  dH/dw_i = -(log p_i + 1) / total, so the mirror step becomes
  log w_i <- (1 + eta lam) log w_i + eta s_hat_i + const: it sharpens the weights every step.
"""

from __future__ import annotations

import math

import torch


def uniform_log_weights(n: int, total: float) -> torch.Tensor:
    if n < 1:
        raise ValueError("there are no candidate negatives to weight (candidates is empty)")
    return torch.full((n,), math.log(total / n), dtype=torch.float64)


def mirror_descent_step(
    log_weights,
    scores,
    *,
    eta: float,
    total: float,
    sparsity: float = 0.0,
    sign: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """log w <- (1 + eta*sparsity) log w + sign * eta * s_hat, renormalised so sum w = total.

    sign=+1 is the derived direction (up-weight s_i > 0, which lowers J); sign=-1 is the
    authors' exp(-eta score), kept to show what it does. Works in log space (no overflow);
    raises ValueError on non-finite scores or weights instead of producing a NaN model."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.shape != log_weights.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and weights {tuple(log_weights.shape)} differ in shape")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores contain NaN or inf ({int((~torch.isfinite(scores)).sum())} of {scores.numel()})")
    for name, value in (("eta", eta), ("total", total), ("sparsity", sparsity)):
        if not math.isfinite(value) or value < 0 or (name == "total" and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'total' else '>= 0'}, got {value!r}")
    scale = float(scores.abs().max()) if normalize else 1.0
    s_hat = scores / scale if scale > 0 else scores
    new = (1.0 + eta * sparsity) * log_weights.double() + sign * eta * s_hat
    new = new - torch.logsumexp(new, 0) + math.log(total)
    if not bool(torch.isfinite(new).all()):
        raise ValueError("the weights became non-finite in the mirror-descent step (eta or scores too large?)")
    return new


def select_top_k(log_weights: torch.Tensor, k: int, total: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest weights, renormalised to sum to total: (indices ascending, weights)."""
    n = log_weights.numel()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of candidates), got {k!r}")
    top = torch.topk(log_weights, k).indices.sort().values
    weights = torch.softmax(log_weights[top], 0) * total
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("the selected weights are not finite")
    return top, weights.float()
