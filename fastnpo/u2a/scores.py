"""The scores s_i = <grad J, grad l_i> of every candidate, all at once.

s_i is a directional derivative: s_i = d/de l_i(theta + e g) at e = 0, g = grad J. After ONE
backward of J, all N scores come from:

* "central" (default): two batched no-grad forward passes over the candidates at
  theta +- h u (u = g / |g|): s_i = |g| (l_i(theta + h u) - l_i(theta - h u)) / 2h, using
  fastnpo's fused log-prob op as it is (its autograd.Function has no forward-mode rule).
  Error: truncation O(h^2) plus fp32 rounding ~ u_fp32 |l_i| / h, where h (fd_step) is the
  norm of the parameter perturbation. The best h depends on the model, so by default it is
  calibrated on J, whose exact directional derivative |g|^2 is known (calibrate_fd_step).
  Measured against per-example backward passes on tiny Llamas (tests/u2a/test_u2a.py,
  benchmarks/results/u2a_scores_cpu.md): max |s - s_ref| / max |s_ref| = 5e-5 .. 3e-3 (full
  model or LoRA; NPO, GA, GradDiff), 2.2e-4 at 512 candidates; Spearman 1.0000.
  Needs fp32 parameters: in bf16 a perturbation this small is lost to rounding (use "jvp").
* "jvp": one forward-mode pass (torch.autograd.forward_ad dual parameters through
  torch.func.functional_call) with a vocabulary-chunked log-softmax written in plain torch ops,
  so no [tokens x vocab] logits exist either; exact up to rounding (measured 1e-7 .. 1e-6).
  Needs attention with a forward-AD rule: the pass switches the model to eager attention
  (PyTorch's SDPA has none). About 2-3 forward passes' cost.
* "per_example": one batch-1 backward per candidate (the authors' way): the reference.

GradDiff's retain term is the same for every candidate: its score <g, alpha grad NLL_retain>
is computed once and added to all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCORE_METHODS = ("central", "jvp", "per_example")


@dataclass
class ScoreResult:
    scores: torch.Tensor  # [N] s_i = <grad J, grad l_i>, fp32 on CPU
    j_value: float
    grad_norm: float
    seconds: float
    method: str
    fd_step: float = float("nan")  # central: the step h used
    fd_check: float = float("nan")  # central: relative error of the same difference on J itself


# Steps tried, largest first, when fd_step is "auto" (0): truncation error grows with h, fp32
# rounding error with 1/h; the best h depends on the model (1e-3 .. 3e-2 on the tiny models).
FD_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def outer_gradient(problem) -> tuple[float, list[torch.Tensor]]:
    """J and grad J (one backward), the parameters' .grad left cleared."""
    params = problem.parameters()
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    for p in params:
        p.grad = None
    j_value = problem.outer_backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    if not math.isfinite(j_value) or not all(bool(torch.isfinite(g).all()) for g in grads):
        raise ValueError(f"J or its gradient is not finite (J = {j_value}): the model or the J set is broken")
    return j_value, grads


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _central_difference(problem, grads, step: float, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """|g| (fn(theta + h u) - fn(theta - h u)) / 2h, u = g / |g|; the parameters are restored
    bit-exactly from a copy (adding and subtracting h u in fp32 would not give them back)."""
    params = problem.parameters()
    norm = math.sqrt(_dot(grads, grads))
    originals = [p.detach().clone() for p in params]
    values = []
    try:
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for p, o, g in zip(params, originals, grads, strict=True):
                    p.copy_(o + (sign * step / norm) * g.to(p.dtype))
                values.append(torch.as_tensor(fn()).double().cpu())
    finally:
        with torch.no_grad():
            for p, o in zip(params, originals, strict=True):
                p.copy_(o)
    return (values[0] - values[1]) * (norm / (2 * step))


def calibrate_fd_step(problem, grads, *, tolerance: float = 3e-4) -> tuple[float, float]:
    """The largest step of FD_LADDER at which the central difference of J along u matches its
    exact value within `tolerance` (relative): (step, its error). J is the one function
    whose directional derivative we know for free, and its J-set forward passes are cheap.
    Its truncation error tracks the candidates' closely; its rounding error is smaller
    (more tokens), hence a tolerance below the accuracy wanted from the scores."""
    exact = _dot(grads, grads)  # the "score" of J itself: <grad J, grad J>
    best = (FD_LADDER[0], float("inf"))
    for step in FD_LADDER:
        error = abs(float(_central_difference(problem, grads, step, problem.outer_value)) - exact) / exact
        if error < best[1]:
            best = (step, error)
        if error <= tolerance:
            return step, error
    return best


def scores_central(problem, grads, *, step: float = 0.0, tolerance: float = 3e-4) -> tuple[torch.Tensor, float, float]:
    """All scores from two no-grad forward passes over the candidates: (scores, h, fd_check).
    step 0 = calibrate h on J (calibrate_fd_step); fd_check = J's relative error at h."""
    if not step >= 0:
        raise ValueError(f"fd_step must be >= 0 (0 = auto), got {step!r}")
    if math.sqrt(_dot(grads, grads)) == 0.0:
        return torch.zeros(problem.num_candidates), step, 0.0
    if step == 0:
        step, check = calibrate_fd_step(problem, grads, tolerance=tolerance)
    else:
        check = float("nan")

    def losses():
        shared = problem.shared_loss()
        return problem.candidate_losses().double() + (0.0 if shared is None else float(shared))

    return _central_difference(problem, grads, step, losses).float(), step, check


def scores_jvp(problem, grads) -> torch.Tensor:
    _, derivs, shared = problem.losses_jvp(grads)
    derivs = derivs.double()
    if shared is not None:
        derivs = derivs + float(shared[1])
    return derivs.float().cpu()


def scores_per_example(problem, grads) -> torch.Tensor:
    """One backward per candidate (the authors' approach; the reference for the tests)."""
    params = problem.parameters()

    def dot_with_grad(loss):
        for p in params:
            p.grad = None
        loss.backward()
        value = _dot([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], grads)
        for p in params:
            p.grad = None
        return value

    shared = problem.shared_loss()
    offset = 0.0 if shared is None else dot_with_grad(shared)
    return torch.tensor(
        [dot_with_grad(problem.candidate_losses([i])[0]) + offset for i in range(problem.num_candidates)]
    )


def compute_scores(
    problem, method: str = "central", *, fd_step: float = 0.0, fd_tolerance: float = 3e-4
) -> ScoreResult:
    """All candidates' scores s_i = <grad J, grad l_i> at the current parameters (one backward
    of J, then the method's passes). fd_step / fd_tolerance: see scores_central."""
    if method not in SCORE_METHODS:
        raise ValueError(f"score method must be one of {SCORE_METHODS}, got {method!r}")
    if problem.num_candidates == 0:
        raise ValueError("there are no candidate negatives to score (candidates is empty)")
    start = time.perf_counter()
    j_value, grads = outer_gradient(problem)
    step = check = float("nan")
    if method == "central":
        scores, step, check = scores_central(problem, grads, step=fd_step, tolerance=fd_tolerance)
    elif method == "jvp":
        scores = scores_jvp(problem, grads)
    else:
        scores = scores_per_example(problem, grads)
    seconds = time.perf_counter() - start
    return ScoreResult(scores, j_value, math.sqrt(_dot(grads, grads)), seconds, method, step, check)
