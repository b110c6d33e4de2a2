"""U2A (Unlearning to Align, arXiv 2504.06659): choose and weight the negatives to unlearn.

Outer problem: minimise J(theta*(w)) over example weights w >= 0 with sum_i w_i = total, where
J is the DPO loss (beta 0.3, reference = the original model) on a small held-out preference
set (the J set), and theta*(w) minimises the weighted unlearning loss sum_i w_i l_i(theta)
(l_i: NPO with beta 0.1, GA or GradDiff on candidate negative i).

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
  down-weights exactly the examples it selected for being most useful (tests/test_u2a.py
  shows that the flipped sign makes J go up on a problem with a known answer).
* Optional sparsity: minimise J + lam * H(w / total) (H the entropy, low for sparse w).
  dH/dw_i = -(log p_i + 1) / total, so the mirror step becomes
  log w_i <- (1 + eta lam) log w_i + eta s_hat_i + const: it sharpens the weights every step.

Scores for ALL candidates at once
---------------------------------
s_i is a directional derivative: s_i = d/de l_i(theta + e g) at e = 0, g = grad J. After ONE
backward of J, all N scores come from:

* "central" (default): two batched no-grad forward passes over the candidates at
  theta +- h u (u = g / |g|): s_i = |g| (l_i(theta + h u) - l_i(theta - h u)) / 2h, using
  fastnpo's fused log-prob op as it is (its autograd.Function has no forward-mode rule).
  Error: truncation O(h^2) plus fp32 rounding ~ u_fp32 |l_i| / h, where h (fd_step) is the
  norm of the parameter perturbation. The best h depends on the model, so by default it is
  calibrated on J, whose exact directional derivative |g|^2 is known (calibrate_fd_step).
  Measured against per-example backward passes on tiny Llamas (tests/test_u2a.py,
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

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data import collate
from ..losses import dpo_from_logprobs, nll_from_logprobs
from ..modeling import LoraConfig, SequenceLogprobModel, add_lora, output_weight
from ..ops import aligned_labels
from ..refcache import reference_logprobs
from . import preference as pref

IGNORE_INDEX = -100
UNLEARN_LOSSES = ("npo", "ga", "graddiff")
SCORE_METHODS = ("central", "jvp", "per_example")
SELECTIONS = ("u2a", "uniform", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ObjectiveConfig:
    """unlearn: the inner loss l_i. average_logprobs: NPO / GA on token-mean log-probs (U2A's
    code; GA is always per-example token-mean) instead of summed ones (the NPO paper).
    J = dpo_scale * DPO(dpo_beta) on summed log-probs unless dpo_average_logprobs."""

    unlearn: str = "npo"
    npo_beta: float = 0.1
    average_logprobs: bool = True
    graddiff_alpha: float = 1.0
    dpo_beta: float = 0.3
    dpo_scale: float = 1.0
    dpo_average_logprobs: bool = False


# ------------------------------------------------------------------------ the LM problem


def _plain_sequence_logprobs(hidden, weight, labels, chunk: int = 8192):
    """Summed target log-probs [B] in plain torch ops (so forward-mode AD flows through them),
    one vocabulary chunk of logits at a time, never the full [B, T, V]."""
    targets = aligned_labels(labels, True, IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    picked = (hidden.float() * weight[safe].float()).sum(-1)
    parts = [
        torch.logsumexp(hidden.float() @ weight[v0 : v0 + chunk].float().T, dim=-1)
        for v0 in range(0, weight.shape[0], chunk)
    ]
    lse = torch.logsumexp(torch.stack(parts), dim=0)
    return ((picked - lse) * mask).sum(-1), mask.sum(-1)


class _JvpProbe(nn.Module):
    """The root module functional_call re-parametrises with dual tensors for "jvp"."""

    def __init__(self, wrapper: SequenceLogprobModel):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, batch):
        hidden = self.wrapper.hidden_states(batch)
        weight = output_weight(self.wrapper.lm)
        return _plain_sequence_logprobs(hidden, weight.to(hidden.dtype), batch["labels"])


@contextlib.contextmanager
def _eager_attention(model):
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is not None:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if config is not None:
            config._attn_implementation = old


class PreferenceUnlearningProblem:
    """A causal LM, a PreferenceSplit's tokenised sets, and their cached reference log-probs.

    The interface the scorer and the loop use (a toy problem in the tests has the same one):
    parameters(), num_candidates, outer_backward() -> J (accumulates grad J), outer_value(),
    candidate_losses(indices) -> l [n] (grad or not, as the ambient mode), shared_loss() ->
    the term every l_i shares (or None), inner_loss(indices, weights, step), and
    losses_jvp(tangents, indices) -> (l, dl) for the "jvp" scores.
    """

    def __init__(
        self,
        model,
        sets: dict,
        objective: ObjectiveConfig,
        *,
        pad_id: int,
        batch_size: int = 16,
        impl: str = "auto",
        cache_dir: str = "",
        tokenizer=None,
    ):
        """sets: tokenised items (data.encode_qa dicts with "index" = position) named j_chosen,
        j_rejected, candidates, and optionally eval_chosen / eval_rejected and retain."""
        if objective.unlearn not in UNLEARN_LOSSES:
            raise ValueError(f"objective.unlearn must be one of {UNLEARN_LOSSES}, got {objective.unlearn!r}")
        if not sets.get("j_chosen") or len(sets["j_chosen"]) != len(sets.get("j_rejected", ())):
            raise ValueError("the J set (held-out preference pairs: j_chosen / j_rejected) is empty or unpaired")
        if not sets.get("candidates"):
            raise ValueError("there are no candidate negatives to unlearn (candidates is empty)")
        if objective.unlearn == "graddiff" and not sets.get("retain"):
            raise ValueError("objective.unlearn=graddiff needs a retain set (retain is empty)")
        self.objective, self.batch_size, self.sets, self.pad_id = objective, batch_size, sets, pad_id
        self.wrapper = SequenceLogprobModel(model, impl=impl)
        self.device = next(model.parameters()).device
        # The reference model is the one we start from: one pass over every set, now, and
        # never again (on disk too when cache_dir is given).
        self.ref = self._reference(tokenizer, cache_dir)
        self._probe = _JvpProbe(self.wrapper)

    @classmethod
    def from_split(cls, model, tokenizer, split, objective, *, template: str, max_length: int, **kwargs):
        """Tokenise a preference.PreferenceSplit (prompt through template, loss on the response)."""
        split.check()
        enc = dict(template=template, max_length=max_length)
        sets = {}
        sets["j_chosen"], sets["j_rejected"] = pref.encode_pairs(tokenizer, split.j, **enc)
        if split.eval:
            sets["eval_chosen"], sets["eval_rejected"] = pref.encode_pairs(tokenizer, split.eval, **enc)
        sets["candidates"] = pref.encode_responses(tokenizer, split.candidates, key="response", **enc)
        if split.retain:
            sets["retain"] = pref.encode_responses(tokenizer, split.retain, key="response", **enc)
        return cls(model, sets, objective, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer, **kwargs)

    def _reference(self, tokenizer, cache_dir: str) -> dict:
        # The same pass and cache key as the trainer and the HF route (refcache.reference_logprobs);
        # the examples' fingerprints cover the template and truncation.
        ref, _ = reference_logprobs(
            self.wrapper.lm,
            tokenizer,
            self.sets,
            pad_token_id=self.pad_id,
            batch_size=self.batch_size,
            impl=self.wrapper.impl,
            cache_dir=cache_dir or None,
            log=lambda message: None,
        )
        return {k: (ref.logps[k].to(self.device), ref.counts[k].to(self.device)) for k in self.sets}

    # -- plumbing
    @property
    def num_candidates(self) -> int:
        return len(self.sets["candidates"])

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.wrapper.parameters() if p.requires_grad]

    def _batches(self, items, indices=None):
        indices = range(len(items)) if indices is None else [int(i) for i in indices]
        indices = list(indices)
        for start in range(0, len(indices), self.batch_size):
            chosen = indices[start : start + self.batch_size]
            batch = collate([items[i] for i in chosen], self.pad_id)
            yield chosen, {k: v.to(self.device) for k, v in batch.items()}

    def logprobs(self, name: str, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and target counts of set `name` (differentiable if grad is on)."""
        logps, counts = [], []
        for _, batch in self._batches(self.sets[name], indices):
            lp, ct, _ = self.wrapper(batch)
            logps.append(lp.float())
            counts.append(ct)
        return torch.cat(logps), torch.cat(counts)

    def _ref(self, name, indices=None):
        logps, counts = self.ref[name]
        if indices is None:
            return logps, counts
        index = torch.as_tensor(list(indices), dtype=torch.long, device=logps.device)
        return logps[index], counts[index]

    # -- losses
    def _candidate_loss_from(self, logps, counts, indices):
        """Per-example l_i from summed log-probs (any autodiff mode: plain torch ops)."""
        o = self.objective
        counts = counts.to(logps.dtype).clamp(min=1)
        if o.unlearn != "npo":
            return logps / counts  # GA / GradDiff: minimising the token-mean log-prob is ascent
        ref, ref_counts = (t.to(logps.device) for t in self._ref("candidates", indices))
        if o.average_logprobs:
            logps, ref = logps / counts, ref / ref_counts.to(ref.dtype).clamp(min=1)
        return (2.0 / o.npo_beta) * F.softplus(o.npo_beta * (logps - ref))

    def candidate_losses(self, indices=None) -> torch.Tensor:
        indices = range(self.num_candidates) if indices is None else indices
        logps, counts = self.logprobs("candidates", indices)
        return self._candidate_loss_from(logps, counts, list(indices))

    def shared_loss(self, indices=None) -> torch.Tensor | None:
        """GradDiff's alpha * token-mean NLL on the retain set (or `indices` of it); else None."""
        if self.objective.unlearn != "graddiff":
            return None
        logps, counts = self.logprobs("retain", indices)
        return self.objective.graddiff_alpha * nll_from_logprobs(logps, counts)

    def inner_loss(self, indices, weights, step: int) -> torch.Tensor:
        """mean_b w_b l_b (+ the shared term on a retain mini-batch)."""
        loss = (weights.to(self.device) * self.candidate_losses(indices)).mean()
        if self.objective.unlearn == "graddiff":
            n = len(self.sets["retain"])
            start = (step * len(indices)) % n
            loss = loss + self.shared_loss([(start + j) % n for j in range(min(len(indices), n))])
        return loss

    def _dpo(self, prefix: str, chosen, rejected, indices=None):
        o = self.objective
        ref_c, ref_cn = self._ref(f"{prefix}_chosen", indices)
        ref_r, ref_rn = self._ref(f"{prefix}_rejected", indices)
        (c, cn), (r, rn) = chosen, rejected
        if o.dpo_average_logprobs:
            c, r = c / cn.clamp(min=1), r / rn.clamp(min=1)
            ref_c, ref_r = ref_c / ref_cn.clamp(min=1), ref_r / ref_rn.clamp(min=1)
        margin = (c - ref_c.to(c.device)) - (r - ref_r.to(r.device))
        loss = dpo_from_logprobs(c, r, ref_c.to(c.device), ref_r.to(r.device), beta=o.dpo_beta, scale=o.dpo_scale)
        return loss, margin

    def outer_backward(self) -> float:
        """J on the J set, its gradient accumulated into .grad one batch at a time."""
        n, total = len(self.sets["j_chosen"]), 0.0
        for idx, _ in self._batches(self.sets["j_chosen"]):
            loss, _ = self._dpo("j", self.logprobs("j_chosen", idx), self.logprobs("j_rejected", idx), idx)
            part = loss * (len(idx) / n)
            part.backward()
            total += part.item()
        return total

    @torch.no_grad()
    def outer_value(self) -> float:
        return float(self._dpo("j", self.logprobs("j_chosen"), self.logprobs("j_rejected"))[0])

    @torch.no_grad()
    def preference_metrics(self, prefix: str = "eval") -> dict:
        """DPO loss (J's definition), preference accuracy (implicit reward margin > 0: logp -
        ref of chosen above that of rejected), logp accuracy (token-mean logp chosen >
        rejected, no reference) and the mean token-mean log-probs."""
        if f"{prefix}_chosen" not in self.sets:
            return {}
        chosen, rejected = self.logprobs(f"{prefix}_chosen"), self.logprobs(f"{prefix}_rejected")
        loss, margin = self._dpo(prefix, chosen, rejected)
        mean_c, mean_r = chosen[0] / chosen[1].clamp(min=1), rejected[0] / rejected[1].clamp(min=1)
        return {
            "dpo_loss": float(loss),
            "pref_accuracy": float((margin > 0).float().mean()),
            "logp_accuracy": float((mean_c > mean_r).float().mean()),
            "chosen_logp": float(mean_c.mean()),
            "rejected_logp": float(mean_r.mean()),
        }

    # -- forward mode
    def losses_jvp(self, tangents: list[torch.Tensor], indices=None):
        """(l_i, <grad l_i, tangent>) of the candidates (and of the shared term) by forward AD."""
        named = [(n, p) for n, p in self._probe.named_parameters() if p.requires_grad]
        if len(named) != len(tangents):
            raise ValueError(f"{len(tangents)} tangents for {len(named)} trainable parameters")
        indices = list(range(self.num_candidates)) if indices is None else list(indices)
        values, derivs = [], []
        with torch.no_grad(), fwAD.dual_level(), _eager_attention(self.wrapper.lm):
            params = {n: fwAD.make_dual(p.detach(), t.to(p.dtype)) for (n, p), t in zip(named, tangents, strict=True)}
            for idx, batch in self._batches(self.sets["candidates"], indices):
                logps, counts = torch.func.functional_call(self._probe, params, (batch,))
                primal, tangent = fwAD.unpack_dual(self._candidate_loss_from(logps, counts, idx))
                values.append(primal.clone())
                derivs.append(tangent.clone())
            shared = None
            if self.objective.unlearn == "graddiff":
                pairs = [
                    torch.func.functional_call(self._probe, params, (b,)) for _, b in self._batches(self.sets["retain"])
                ]
                logps, counts = (torch.cat(t) for t in zip(*pairs, strict=True))
                nll = self.objective.graddiff_alpha * nll_from_logprobs(logps, counts)
                shared = tuple(t.clone() for t in fwAD.unpack_dual(nll))
        return torch.cat(values), torch.cat(derivs), shared


# ----------------------------------------------------------------------------- scores


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


# ------------------------------------------------------------------------- weights


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


# --------------------------------------------------------------------------- the loop


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


def _raise_first(checks, error=ValueError) -> None:
    for ok, key, message, value in checks:
        if not ok:
            raise error(f"{key}: {message}, got {value!r}")


def check_bilevel(cfg: BilevelConfig, num_candidates: int | None = None) -> None:
    """ValueError naming the first bad key (num_candidates: also check k against it)."""
    if num_candidates is not None and num_candidates < 1:
        raise ValueError("there are no candidate negatives (candidates is empty)")
    i = cfg.inner
    k_ok = cfg.selection == "uniform" or num_candidates is None or cfg.k <= num_candidates
    _raise_first(
        [
            (cfg.selection in SELECTIONS, "bilevel.selection", f"must be one of {SELECTIONS}", cfg.selection),
            (cfg.k >= 1, "bilevel.k", "must be >= 1", cfg.k),
            (k_ok, "bilevel.k", f"must be <= {num_candidates} (the number of candidates)", cfg.k),
            (
                cfg.score_method in SCORE_METHODS,
                "bilevel.score_method",
                f"must be one of {SCORE_METHODS}",
                cfg.score_method,
            ),
            (cfg.select_by in ("weight", "score"), "bilevel.select_by", "must be weight or score", cfg.select_by),
            (cfg.sign in (1.0, -1.0), "bilevel.sign", "must be 1 or -1", cfg.sign),
            (cfg.outer_iterations >= 1, "bilevel.outer_iterations", "must be >= 1", cfg.outer_iterations),
            (cfg.eta >= 0, "bilevel.eta", "must be >= 0", cfg.eta),
            (cfg.sparsity >= 0, "bilevel.sparsity", "must be >= 0", cfg.sparsity),
            (cfg.total >= 0, "bilevel.total", "must be >= 0 (0 = k)", cfg.total),
            (cfg.fd_step >= 0, "bilevel.fd_step", "must be >= 0 (0 = calibrate)", cfg.fd_step),
            (cfg.fd_tolerance > 0, "bilevel.fd_tolerance", "must be > 0", cfg.fd_tolerance),
            (i.lr > 0, "bilevel.inner.lr", "must be > 0", i.lr),
            (i.epochs >= 1, "bilevel.inner.epochs", "must be >= 1", i.epochs),
            (i.batch_size >= 1, "bilevel.inner.batch_size", "must be >= 1", i.batch_size),
            (i.max_grad_norm >= 0, "bilevel.inner.max_grad_norm", "must be >= 0 (0 = no clipping)", i.max_grad_norm),
        ]
    )


def inner_unlearn(problem, indices: torch.Tensor, weights: torch.Tensor, cfg: InnerConfig, seed: int) -> dict:
    """AdamW on mean_b w_b l_b over mini-batches of the selection (an unbiased estimate of
    sum_i w_i l_i / k: with weights summing to total, total / k sets the unlearning strength).
    A non-finite loss or gradient stops BEFORE the step that would write it into the model,
    with a ValueError (the model keeps its last finite state)."""
    params = problem.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps, losses = 0, []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(indices), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            part = order[start : start + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = problem.inner_loss(indices[part].tolist(), weights[part], steps)
            if not torch.isfinite(loss):
                raise ValueError(f"the inner loss became non-finite at step {steps}; the model was not updated")
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if not torch.isfinite(norm):
                raise ValueError(f"the inner gradient became non-finite at step {steps}; the model was not updated")
            optimizer.step()
            losses.append(loss.item())
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1]}


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
            entry.update(
                j_at_scoring=result.j_value,
                scores=result.scores.tolist(),
                score_seconds=result.seconds,
                fd_step=result.fd_step,
                fd_check=result.fd_check,
                grad_norm=result.grad_norm,
            )
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


# ------------------------------------------------------------------------ config and CLI


@dataclass
class U2AModelConfig:
    """name_or_path: a causal LM (hub name or folder); "" builds a tiny Llama (fastnpo.tiny)
    with a BPE tokenizer trained on the data, then fine-tunes it on the task's sft texts
    (sft_epochs) so there is something to unlearn. lora: train LoRA adapters only."""

    name_or_path: str = ""
    tokenizer: str = ""
    dtype: str = "float32"
    impl: str = "auto"
    attn_implementation: str = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)
    vocab_size: int = 400
    hidden_size: int = 64
    num_hidden_layers: int = 2
    sft_epochs: int = 25
    sft_lr: float = 3e-3
    sft_batch_size: int = 16


@dataclass
class U2ADataConfig:
    """source: "synthetic" (preference.synthetic_preference_task) or a preference data set
    (preference.load_preference_data). j_size / eval_size / max_candidates: the split of a
    real set; num_*: the synthetic task's sizes."""

    source: str = "synthetic"
    split: str = "train"
    preference_key: str = ""
    j_size: int = 24
    eval_size: int = 24
    max_candidates: int = 0
    num_bad: int = 32
    num_decoy: int = 16
    num_neutral: int = 16
    template: str = "[INST] {question} [/INST]"
    max_length: int = 96
    batch_size: int = 32


@dataclass
class U2ARunConfig:
    """threads: torch CPU threads (0 = torch's default; 1 is fastest on a busy 2-core machine).
    reward_prompts: evaluation prompts answered greedily and scored by the synthetic reward.
    cache_dir: keep the reference log-probs on disk too (refcache; "" = in memory only)."""

    output_dir: str = "runs/u2a"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    cache_dir: str = ""
    plot: bool = True
    reward_prompts: int = 16
    max_new_tokens: int = 24


@dataclass
class U2AConfig:
    model: U2AModelConfig = field(default_factory=U2AModelConfig)
    data: U2ADataConfig = field(default_factory=U2ADataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    run: U2ARunConfig = field(default_factory=U2ARunConfig)


def load_u2a_config(path=None, overrides=()) -> U2AConfig:
    """Defaults <- YAML <- dotted overrides; ConfigError naming the key for unknown keys,
    wrong types and bad values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(U2AConfig)
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        config = OmegaConf.to_object(OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        first = str(error).splitlines()[0]
        raise ConfigError(f"{key}: {first}" if key else first) from None
    o, d = config.objective, config.data
    _raise_first(
        [
            (o.unlearn in UNLEARN_LOSSES, "objective.unlearn", f"must be one of {UNLEARN_LOSSES}", o.unlearn),
            (o.npo_beta > 0, "objective.npo_beta", "must be > 0", o.npo_beta),
            (o.dpo_beta > 0, "objective.dpo_beta", "must be > 0", o.dpo_beta),
            (o.dpo_scale > 0, "objective.dpo_scale", "must be > 0", o.dpo_scale),
            (d.j_size >= 1, "data.j_size", "must be >= 1 (U2A needs a J set)", d.j_size),
            (d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size),
            (config.model.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}", config.model.dtype),
        ],
        ConfigError,
    )
    try:
        check_bilevel(config.bilevel)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return config


# ------------------------------------------------------------------------------ the run


@dataclass
class PreparedTask:
    model: nn.Module
    tokenizer: object
    split: object  # preference.PreferenceSplit
    synthetic: bool


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def prepare_task(config: U2AConfig, log: Callable[[str], None] = print) -> PreparedTask:
    """The split, the tokenizer and the starting model (= the reference model)."""
    from ..tiny import TinyModelSpec, build_tiny_model

    d, m, seed = config.data, config.model, config.run.seed
    synthetic = d.source == "synthetic"
    if synthetic:
        sizes = dict(num_bad=d.num_bad, num_decoy=d.num_decoy, num_neutral=d.num_neutral)
        split = pref.synthetic_preference_task(seed, num_j=d.j_size, num_eval=d.eval_size, **sizes)
    else:
        data = pref.load_preference_data(d.source, d.split, preference_key=d.preference_key)
        sizes = dict(j_size=d.j_size, eval_size=d.eval_size, max_candidates=d.max_candidates)
        split = pref.split_preference(data, seed=seed, **sizes)
    split.check()
    if m.name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation
        )
    else:
        tokenizer = pref.tokenizer_for(split, template=d.template, vocab_size=m.vocab_size)
        spec = TinyModelSpec(
            hidden_size=m.hidden_size,
            intermediate_size=m.hidden_size * 11 // 4,
            num_hidden_layers=m.num_hidden_layers,
            vocab_size=m.vocab_size,
        )
        model = build_tiny_model(tokenizer, spec, seed)
    model = model.to(_device(config.run.device))
    if split.sft and m.sft_epochs > 0:
        start = time.perf_counter()
        loss = pref.supervised_finetune(
            model,
            tokenizer,
            split.sft,
            template=d.template,
            max_length=d.max_length,
            epochs=m.sft_epochs,
            lr=m.sft_lr,
            batch_size=m.sft_batch_size,
            seed=seed,
        )
        took = time.perf_counter() - start
        log(f"[u2a] fine-tuned the base model on {len(split.sft)} texts: NLL {loss:.3f} ({took:.1f}s)")
    return PreparedTask(model, tokenizer, split, synthetic)


def weight_histogram(weights: list[float], kinds: list[str], bins: int = 5) -> str:
    """Text histogram of the candidates' weights, with the kinds in each bin."""
    top = max(weights) if weights else 0.0
    edges = [top * i / bins for i in range(bins + 1)]
    lines = []

    def line(label, members):
        by_kind = {k: sum(1 for i in members if kinds[i] == k) for k in dict.fromkeys(kinds)}
        detail = ", ".join(f"{k} {v}" for k, v in by_kind.items() if v)
        lines.append(f"    {label:>15} {'#' * len(members):<40} {len(members)}{f' ({detail})' if detail else ''}")

    line("w = 0", [i for i, w in enumerate(weights) if w == 0])
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i, w in enumerate(weights) if w > 0 and (lo < w <= hi or (b == 0 and w <= hi))]
        line(f"({lo:.2f}, {hi:.2f}]", members)
    return "\n".join(lines)


def run_prepared(config: U2AConfig, task: PreparedTask, log: Callable[[str], None] = print) -> dict:
    """The bi-level loop on a prepared task (whose model it trains in place)."""
    model = task.model
    if config.model.lora.enabled:
        # At initialisation LoRA's B is zero: the wrapped model IS the original, so the
        # reference log-probs computed through it below are the original model's.
        model = add_lora(model, config.model.lora)
    d = config.data
    problem = PreferenceUnlearningProblem.from_split(
        model,
        task.tokenizer,
        task.split,
        config.objective,
        template=d.template,
        max_length=d.max_length,
        batch_size=d.batch_size,
        impl=config.model.impl,
        cache_dir=config.run.cache_dir,
    )
    kinds = [c.get("kind", "unknown") for c in task.split.candidates]
    prompts = [p["prompt"] for p in task.split.eval[: config.run.reward_prompts]]

    def evaluate() -> dict:
        metrics = problem.preference_metrics("eval")
        if task.synthetic and prompts:
            metrics["reward"], _ = pref.greedy_reward(
                model, task.tokenizer, prompts, template=d.template, max_new_tokens=config.run.max_new_tokens
            )
        return metrics

    def report(entry: dict) -> None:
        if entry["iteration"] == 0:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
            log(f"[u2a] start: J {entry['j']:.4f} | held-out: {metrics}")
            return
        t, prev = entry["iteration"], entry["j_before"]
        chosen = {k: sum(1 for i in entry["selected"] if kinds[i] == k) for k in dict.fromkeys(kinds)}
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items())
        log(
            f"[u2a] outer {t}/{config.bilevel.outer_iterations}: J {prev:.4f} -> {entry['j']:.4f} | "
            f"selected {len(entry['selected'])}: {chosen} | {entry['inner']['steps']} inner steps"
        )
        log(f"[u2a]   held-out: {metrics}")
        if config.bilevel.selection != "uniform":
            log(f"[u2a]   selected indices: {entry['selected']}")
        log("[u2a]   weights:\n" + weight_histogram(entry["weights"], kinds))

    start = time.perf_counter()
    out = run_bilevel(problem, config.bilevel, seed=config.run.seed, evaluate=evaluate, on_iteration=report)
    by_kind = {
        k: [w for w, kk in zip(out["final_weights"], kinds, strict=True) if kk == k] for k in dict.fromkeys(kinds)
    }
    out.update(
        kinds=kinds,
        seconds=time.perf_counter() - start,
        final_weight_by_kind={
            k: {"count": len(v), "sum": sum(v), "selected": sum(1 for w in v if w > 0)} for k, v in by_kind.items()
        },
    )
    return out


def save_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = result["history"]
    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(its, [h["j"] for h in history], "o-")
    axes[0].set(title="J (DPO loss on the J set)", xlabel="outer iteration")
    for key in ("pref_accuracy", "logp_accuracy", "reward"):
        if key in history[0]["metrics"]:
            axes[1].plot(its, [h["metrics"][key] for h in history], "o-", label=key)
    axes[1].set(title="held-out metrics", xlabel="outer iteration")
    axes[1].legend()
    for ax in axes[:2]:
        ax.set_xticks(its)
    colors = {"bad": "tab:green", "decoy": "tab:red", "neutral": "tab:gray"}
    kinds, weights = result["kinds"], result["final_weights"]
    axes[2].bar(range(len(weights)), weights, color=[colors.get(k, "tab:blue") for k in kinds], width=1.0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors.get(k, "tab:blue")) for k in dict.fromkeys(kinds)]
    axes[2].legend(handles, list(dict.fromkeys(kinds)))
    axes[2].set(title="final weights by candidate", xlabel="candidate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_u2a(config_path=None, overrides=(), log: Callable[[str], None] = print) -> dict:
    """`fastnpo u2a --config ...`: load the config, prepare the task, run the loop; writes
    results.json (and u2a.png) to run.output_dir and returns a summary dict."""
    from omegaconf import OmegaConf

    config = load_u2a_config(config_path, overrides)
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    out_dir = Path(config.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = prepare_task(config, log)
    result = run_prepared(config, task, log)
    result["config"] = OmegaConf.to_container(OmegaConf.structured(config))
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    summary = {
        "output_dir": str(out_dir),
        "results": str(out_dir / "results.json"),
        "j": [h["j"] for h in result["history"]],
        "eval": result["history"][-1]["metrics"],
        "final_weight_by_kind": result["final_weight_by_kind"],
    }
    if config.run.plot:
        save_plot(result, out_dir / "u2a.png")
        summary["plot"] = str(out_dir / "u2a.png")
    return summary


# ------------------------------------------------------------------- side-by-side comparison

VARIANTS = {
    "u2a": [],
    "uniform": ["bilevel.selection=uniform"],
    "random": ["bilevel.selection=random"],
    # The authors' loop: top-k by score, weights multiplied by exp(-eta * score).
    "u2a_authors_sign": ["bilevel.select_by=score", "bilevel.sign=-1"],
    # Every candidate, with inner.epochs scaled by k / N: as many inner steps as u2a / random.
    "uniform_equal_steps": ["bilevel.selection=uniform"],
}


def machine_info() -> dict:
    import os
    import platform

    import transformers

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def compare_selections(
    config_path=None,
    overrides=(),
    *,
    variants=("u2a", "uniform", "random"),
    seeds=(0,),
    log: Callable[[str], None] = print,
) -> dict:
    """Each variant from the same prepared task (same base model and data) per seed."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for seed in seeds:
        base = load_u2a_config(config_path, [*overrides, f"run.seed={seed}"])
        if base.run.threads > 0:
            torch.set_num_threads(base.run.threads)
        torch.manual_seed(seed)
        task = prepare_task(base, log)
        for name in variants:
            extra = list(VARIANTS[name])
            if name == "uniform_equal_steps":
                epochs = base.bilevel.inner.epochs * base.bilevel.k / len(task.split.candidates)
                extra.append(f"bilevel.inner.epochs={max(1, round(epochs))}")
            config = load_u2a_config(config_path, [*overrides, f"run.seed={seed}", *extra])
            torch.manual_seed(seed)
            result = run_prepared(config, copy.deepcopy(task), log=lambda message: None)
            first, last = result["history"][0], result["history"][-1]
            row = {
                "variant": name,
                "seed": seed,
                "j_start": first["j"],
                "j_end": last["j"],
                "j_path": [h["j"] for h in result["history"]],
                "eval_start": first["metrics"],
                "eval_end": last["metrics"],
                "selected_by_kind": {k: v["selected"] for k, v in result["final_weight_by_kind"].items()},
                "weight_by_kind": {k: v["sum"] for k, v in result["final_weight_by_kind"].items()},
                "inner_steps": sum(h["inner"]["steps"] for h in result["history"][1:]),
                "seconds": result["seconds"],
            }
            rows.append(row)
            end = ", ".join(f"{k} {v:.3f}" for k, v in last["metrics"].items())
            log(
                f"[u2a] seed {seed} {name:>16}: J {row['j_start']:.4f} -> {row['j_end']:.4f} | {end} | "
                f"selected {row['selected_by_kind']}"
            )
    return {"rows": rows, "machine": machine_info(), "overrides": list(overrides), "config": str(config_path)}


def comparison_markdown(result: dict) -> str:
    """Mean (min..max over seeds) per variant: J after the first and the last outer iteration,
    the held-out metrics at the end, inner steps and the final selection by kind; the first
    row is the starting (= reference) model."""
    rows = result["rows"]
    keys = [
        k
        for k in ("pref_accuracy", "logp_accuracy", "dpo_loss", "reward", "chosen_logp", "rejected_logp")
        if rows and k in rows[0]["eval_end"]
    ]

    def cell(values, digits=3):
        mean = sum(values) / len(values)
        if len(values) == 1 or max(values) == min(values):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"

    lines = [
        "| variant | seeds | J after outer 1 | J end | "
        + " | ".join(f"held-out {k}" for k in keys)
        + " | inner steps | selected at the end |",
        "|---" * (len(keys) + 6) + "|",
    ]
    firsts = {r["seed"]: r for r in rows}.values()
    lines.append(
        f"| start (reference model) | {len(firsts)} | - | {cell([r['j_start'] for r in firsts], 4)} | "
        + " | ".join(cell([r["eval_start"][k] for r in firsts]) for k in keys)
        + " | 0 | - |"
    )
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        kinds = {k: cell([r["selected_by_kind"][k] for r in mine], 1) for k in mine[0]["selected_by_kind"]}
        lines.append(
            f"| {name} | {len(mine)} | {cell([r['j_path'][1] for r in mine], 4)} | "
            f"{cell([r['j_end'] for r in mine], 4)} | "
            + " | ".join(cell([r["eval_end"][k] for r in mine]) for k in keys)
            + f" | {cell([r['inner_steps'] for r in mine], 0)} | "
            + ", ".join(f"{k} {v}" for k, v in kinds.items())
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastnpo.u2a", description="U2A: select and weight negatives.")
    parser.add_argument("--config", default=None)
    parser.add_argument(
        "--compare",
        nargs="*",
        default=None,
        metavar="VARIANT",
        help=f"run variants side by side ({', '.join(VARIANTS)}; none given = u2a uniform random)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default=None, help="comparison: write OUT.json and OUT.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.compare is None:
        print(json.dumps(run_u2a(args.config, args.overrides), indent=1))
        return 0
    result = compare_selections(
        args.config, args.overrides, variants=args.compare or ("u2a", "uniform", "random"), seeds=args.seeds
    )
    table = comparison_markdown(result)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
