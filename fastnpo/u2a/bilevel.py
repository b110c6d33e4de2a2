"""The bi-level loop: per outer iteration, score, reweight and select the candidates, then
unlearn the weighted selection (inner AdamW).

Outer problem: minimise J(theta*(w)) over example weights w >= 0 with sum_i w_i = total, where
J is the DPO loss (beta 0.3, reference = the original model) on a small held-out preference
set (the J set), and theta*(w) minimises the weighted unlearning loss sum_i w_i l_i(theta)
(l_i: NPO with beta 0.1, GA or GradDiff on candidate negative i). The sign of every update is
derived in weights.py; the scores come from scores.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import require
from .scores import SCORE_METHODS, compute_scores
from .training import adamw_epochs
from .weights import mirror_descent_step, select_top_k, uniform_log_weights

SELECTIONS = ("u2a", "uniform", "random")


@dataclass
class InnerConfig:
    """AdamW on mean_b w_b l_b over the selected candidates, for `epochs` passes."""

    epochs: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    max_grad_norm: float = 1.0


@dataclass
class BilevelConfig:
    """selection: u2a (scores + mirror descent + top-k), uniform (all candidates, weight 1) or
    random (a seeded random subset of k, weight 1). total: the simplex mass (0 = k). eta: the
    largest log-weight change per outer iteration (scores normalised by max |s|). select_by:
    "weight" (top-k of the mirror-descent iterate) or "score" (top-k of the current scores,
    as the authors' loop). sign: +1 derived; -1 = the authors' exp(-eta score)."""

    selection: str = "u2a"
    k: int = 32
    total: float = 0.0
    outer_iterations: int = 3
    eta: float = 1.0
    sparsity: float = 0.0
    select_by: str = "weight"
    sign: float = 1.0
    normalize_scores: bool = True
    score_method: str = "central"
    fd_step: float = 0.0
    fd_tolerance: float = 3e-4
    inner: InnerConfig = field(default_factory=InnerConfig)


def check_bilevel(cfg: BilevelConfig, num_candidates: int | None = None) -> None:
    """ConfigError (a ValueError) naming the first bad key (num_candidates: also check k against it)."""
    if num_candidates is not None and num_candidates < 1:
        raise ValueError("there are no candidate negatives (candidates is empty)")
    i = cfg.inner
    k_ok = cfg.selection == "uniform" or num_candidates is None or cfg.k <= num_candidates
    require(cfg.selection in SELECTIONS, "bilevel.selection", f"must be one of {SELECTIONS}", cfg.selection)
    require(cfg.k >= 1, "bilevel.k", "must be >= 1", cfg.k)
    require(k_ok, "bilevel.k", f"must be <= {num_candidates} (the number of candidates)", cfg.k)
    require(
        cfg.score_method in SCORE_METHODS, "bilevel.score_method", f"must be one of {SCORE_METHODS}", cfg.score_method
    )
    require(cfg.select_by in ("weight", "score"), "bilevel.select_by", "must be weight or score", cfg.select_by)
    require(cfg.sign in (1.0, -1.0), "bilevel.sign", "must be 1 or -1", cfg.sign)
    require(cfg.outer_iterations >= 1, "bilevel.outer_iterations", "must be >= 1", cfg.outer_iterations)
    require(cfg.eta >= 0, "bilevel.eta", "must be >= 0", cfg.eta)
    require(cfg.sparsity >= 0, "bilevel.sparsity", "must be >= 0", cfg.sparsity)
    require(cfg.total >= 0, "bilevel.total", "must be >= 0 (0 = k)", cfg.total)
    require(cfg.fd_step >= 0, "bilevel.fd_step", "must be >= 0 (0 = calibrate)", cfg.fd_step)
    require(cfg.fd_tolerance > 0, "bilevel.fd_tolerance", "must be > 0", cfg.fd_tolerance)
    require(i.lr > 0, "bilevel.inner.lr", "must be > 0", i.lr)
    require(i.epochs >= 1, "bilevel.inner.epochs", "must be >= 1", i.epochs)
    require(i.batch_size >= 1, "bilevel.inner.batch_size", "must be >= 1", i.batch_size)
    require(i.max_grad_norm >= 0, "bilevel.inner.max_grad_norm", "must be >= 0 (0 = no clipping)", i.max_grad_norm)


def inner_unlearn(problem, indices: torch.Tensor, weights: torch.Tensor, cfg: InnerConfig, seed: int) -> dict:
    """AdamW on mean_b w_b l_b over mini-batches of the selection (an unbiased estimate of
    sum_i w_i l_i / k: with weights summing to total, total / k sets the unlearning strength).
    A non-finite loss or gradient stops BEFORE the step that would write it into the model,
    with a ValueError (the model keeps its last finite state)."""

    def loss_of(part, step):
        return problem.inner_loss(indices[part].tolist(), weights[part], step)

    losses = adamw_epochs(
        problem.parameters(),
        len(indices),
        loss_of,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=seed,
        max_grad_norm=cfg.max_grad_norm,
        name="inner",
    )
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}


def _u2a_selection(problem, cfg: BilevelConfig, log_w: torch.Tensor, k: int, total: float):
    """Score at the current parameters, take the mirror step, select the top k:
    (new log-weights, selected indices, their weights, the entry's scoring fields)."""
    result = compute_scores(problem, cfg.score_method, fd_step=cfg.fd_step, fd_tolerance=cfg.fd_tolerance)
    log_w = mirror_descent_step(
        log_w,
        result.scores,
        eta=cfg.eta,
        total=total,
        sparsity=cfg.sparsity,
        sign=cfg.sign,
        normalize=cfg.normalize_scores,
    )
    ranking = log_w if cfg.select_by == "weight" else result.scores.double()
    indices, _ = select_top_k(ranking, k, total)
    weights = torch.softmax(log_w[indices], 0).float() * total
    info = dict(
        j_at_scoring=result.j_value,
        scores=result.scores.tolist(),
        score_seconds=result.seconds,
        fd_step=result.fd_step,
        fd_check=result.fd_check,
        grad_norm=result.grad_norm,
    )
    return log_w, indices, weights, info


def run_bilevel(
    problem,
    cfg: BilevelConfig,
    *,
    seed: int = 0,
    evaluate: Callable[[], dict] | None = None,
    on_iteration: Callable[[dict], None] | None = None,
) -> dict:
    """The outer loop: per iteration, (u2a) score at the current parameters, mirror step,
    top-k; then inner unlearning on the weighted selection. Returns the history (J, selection,
    weights, scores, metrics per iteration) and the final weight of every candidate;
    on_iteration(entry) sees each iteration's entry as it completes."""
    n = problem.num_candidates
    check_bilevel(cfg, n)
    k = n if cfg.selection == "uniform" else cfg.k
    total = cfg.total or float(k)
    log_w = uniform_log_weights(n, total)
    fixed = None
    if cfg.selection == "random":
        fixed = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    history = [{"iteration": 0, "j": problem.outer_value(), "metrics": evaluate() if evaluate else {}}]
    if on_iteration is not None:
        on_iteration(history[0])
    weights_full = torch.zeros(n)
    for t in range(1, cfg.outer_iterations + 1):
        entry: dict = {"iteration": t, "j_before": history[-1]["j"]}
        if cfg.selection == "u2a":
            log_w, indices, weights, info = _u2a_selection(problem, cfg, log_w, k, total)
            entry.update(info)
        else:
            indices = torch.arange(n) if fixed is None else fixed
            weights = torch.full((k,), total / k)
        weights_full = torch.zeros(n).index_copy(0, indices, weights)
        entry["inner"] = inner_unlearn(problem, indices, weights, cfg.inner, seed + t)
        entry.update(
            selected=indices.tolist(),
            weights=weights_full.tolist(),
            j=problem.outer_value(),
            metrics=evaluate() if evaluate else {},
        )
        history.append(entry)
        if on_iteration is not None:
            on_iteration(entry)
    return {"history": history, "final_weights": weights_full.tolist()}
