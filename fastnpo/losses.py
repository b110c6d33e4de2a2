"""Unlearning losses.

Two layers:
- losses of per-sequence log-probs (`*_from_logprobs`), reusable wherever the log-probs come
  from (the trainer, the Hugging Face integration, U2A);
- `npo_loss` and `ga_loss`, the public contract, which go from hidden states and the lm_head
  weight to the scalar loss through the fused log-prob op.

Every loss takes optional per-example `weights` [B] (>= 0, default 1) and returns a scalar.
"""

import torch
import torch.nn.functional as F

from .ops import (
    IGNORE_INDEX,
    aligned_labels,
    fused_sequence_loss,
    resolve_design,
    sequence_logprobs,
    token_logprobs_flat,
)
from .ops.checks import (
    check_finite_number,
    check_hidden_and_weight,
    check_labels,
    check_per_sequence,
    check_positive,
    value_checks_on,
)


def _vector(name: str, value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [B], got {getattr(value, 'shape', type(value).__name__)}")
    return value


def _weights(weights, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(like)
    return check_per_sequence("weights", weights, like.shape[0], like.device, nonnegative=True).to(like.dtype)


def _same_length(name: str, value, like: torch.Tensor) -> torch.Tensor:
    return check_per_sequence(name, value, like.shape[0], like.device).to(like.dtype)


def _counts(value, like: torch.Tensor) -> torch.Tensor:
    """Target-token counts [B], integer or float."""
    if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool:
        value = value.to(like.dtype)
    return _same_length("token_counts", value, like)


def npo_from_logprobs(logps, ref_logps, *, beta: float = 0.1, weights=None) -> torch.Tensor:
    """NPO: mean_b w_b * (2/beta) * softplus(beta * (logp_b - ref_logp_b)).

    = -(2/beta) log sigmoid(-beta (logp - ref)). Its gradient weight 2 pi^beta / (pi^beta + ref^beta)
    starts at 1 and fades once an example is forgotten; beta -> 0 recovers gradient ascent.
    Summed (NPO paper) or token-mean (MUSE, U2A) log-probs both work: pass the same kind for
    logps and ref_logps.
    """
    logps = _vector("logps", logps)
    beta = check_positive("beta", beta)
    ref_logps = _same_length("ref_logps", ref_logps, logps)
    return (_weights(weights, logps) * (2.0 / beta) * F.softplus(beta * (logps - ref_logps))).mean()


# SimNPO's default beta (the paper's TOFU forget05 setting), here and for methods.npo.SimNPO: the
# one place it is written (the loss sits below the methods, so the method reads it from here).
SIMNPO_BETA = 2.5


def simnpo_from_logprobs(
    logps, token_counts, *, beta: float = SIMNPO_BETA, gamma: float = 0.0, weights=None
) -> torch.Tensor:
    """SimNPO (no reference model; methods/npo.py): mean_b w_b * -(2/beta) log sigmoid(-(beta/|y_b|) logp_b - gamma).

    logps summed over the |y_b| = token_counts[b] answer tokens.
    """
    logps = _vector("logps", logps)
    beta = check_positive("beta", beta)
    gamma = check_finite_number("gamma", gamma)
    counts = _counts(token_counts, logps)
    if value_checks_on() and bool((counts <= 0).any()):
        raise ValueError("token_counts must be > 0 for every sequence (an answer with no tokens)")
    margin = -(beta / counts) * logps - gamma
    return (_weights(weights, logps) * -(2.0 / beta) * F.logsigmoid(margin)).mean()


def dpo_from_logprobs(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    scale: float | None = None,
    weights=None,
) -> torch.Tensor:
    """DPO: mean_b w_b * -scale * log sigmoid(beta * [(chosen - ref_chosen) - (rejected - ref_rejected)]).

    scale defaults to 2/beta (the NPO authors' DPO-on-refusals baseline; the legacy TOFU code and the
    usual DPO loss use scale=1). That baseline: chosen = an "I don't know" answer, rejected = the
    forget answer (methods/dpo.py).
    """
    chosen = _vector("chosen_logps", chosen_logps)
    beta = check_positive("beta", beta)
    scale = 2.0 / beta if scale is None else check_positive("scale", scale)
    rejected = _same_length("rejected_logps", rejected_logps, chosen)
    ref_chosen = _same_length("ref_chosen_logps", ref_chosen_logps, chosen)
    ref_rejected = _same_length("ref_rejected_logps", ref_rejected_logps, chosen)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return (_weights(weights, chosen) * -scale * F.logsigmoid(margin)).mean()


def nll_from_logprobs(logps, token_counts, *, weights=None) -> torch.Tensor:
    """Token-mean negative log-likelihood: -sum_b w_b logp_b / sum_b |y_b| (retain loss).

    With unit weights this is what a Hugging Face causal LM returns as `loss` for the batch.
    """
    logps = _vector("logps", logps)
    counts = _counts(token_counts, logps)
    total = counts.sum()
    if value_checks_on() and not bool(total > 0):
        raise ValueError("token_counts sums to 0: the batch has no target tokens")
    return -(_weights(weights, logps) * logps).sum() / total


def ga_from_logprobs(logps, token_counts, *, weights=None) -> torch.Tensor:
    """Gradient ascent: minus the token-mean NLL, sum_b w_b logp_b / sum_b |y_b|."""
    return -nll_from_logprobs(logps, token_counts, weights=weights)


def kl_from_logits(logits, ref_logits, attended) -> torch.Tensor:
    """Position-mean KL(pi_ref || pi_theta) over the full vocabulary, NPO+KL's retain term as the
    benchmark codes define it (open-unlearning compute_kl_divergence, TOFU dataloader.py).

    logits / ref_logits [B, T, V]; attended [B, T] bool: the positions with attention (prompt and
    answer). The reference codes average over every position, padding included, which under
    dynamic padding would depend on the batch's width: fastnpo averages over the attended
    positions instead (the one deliberate difference). Needs full logits: NPO+KL's cost.
    """
    if logits.shape != ref_logits.shape or logits.dim() != 3:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must be equal [B, T, V]"
        )
    if attended.shape != logits.shape[:2]:
        raise ValueError(f"attended must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(attended.shape)}")
    mask = attended.bool()
    if not bool(mask.any()):
        raise ValueError("attended has no position: the KL term is undefined")
    logp = logits[mask].float().log_softmax(-1)
    ref = ref_logits[mask].float().log_softmax(-1)
    return F.kl_div(logp, ref, log_target=True, reduction="batchmean")


def npo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
    impl: str = "auto",
    filter_eps="auto",
    design: str | None = None,
    fused=None,
) -> torch.Tensor:
    """NPO loss from hidden states: mean_b w_b (2/beta) softplus(beta (logp_b - ref_logps_b)).

    logp_b = sequence_logprobs(hidden, weight, labels, shift=shift)[b], summed over the target
    tokens as in the NPO paper's code. hidden [B, T, D], labels [B, T] (Hugging Face
    convention), ref_logps [B] the frozen reference model's summed log-probs of the same
    targets, weights [B] >= 0 (default 1). Every row needs at least one target token (else
    ValueError naming the rows).

    design (ops/designs.py; status and measurements in ops/DESIGNS.md): "two_call" (default) runs
    the usual forward, then backward. "two_sweep" computes the gradients in the forward call
    (ops.autograd.FusedSequenceLossFunction) and allows one backward; it saves no FLOPs (the
    log-sum-exp must be complete before any probability is known: two sweeps over the vocabulary,
    8NDV). "one_pass" also computes them in the forward call and allows one backward, in ONE sweep
    of chunks of whole sequences (ops/one_pass.py: 6NDV, library matmuls, exact, filter_eps unused),
    valid because NPO is a mean of per-sequence terms. "epilogue" (experimental, Triton) is
    one_pass's contract through Triton GEMMs. All give the same values and gradients up to
    rounding. Weights or ref_logps that require grad (U2A) take the "two_call" path whatever design
    says: the single-call designs return no gradient for them. fused: the deprecated spelling
    (False -> "two_call", True -> "two_sweep", "one_pass", "epilogue"; DeprecationWarning).
    """
    check_hidden_and_weight(hidden, weight, exact_dim=3)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    beta = check_positive("beta", beta)
    design = resolve_design(design, fused, "two_call")
    batch = hidden.shape[0]
    ref_logps = check_per_sequence("ref_logps", ref_logps, batch, hidden.device)
    if weights is not None:
        weights = check_per_sequence("weights", weights, batch, hidden.device, nonnegative=True)
    _check_every_row_has_targets(labels, shift, ignore_index)

    def loss_from_logprobs(logps):
        return npo_from_logprobs(logps, ref_logps, beta=beta, weights=weights)

    if design != "two_call" and not (ref_logps.requires_grad or (weights is not None and weights.requires_grad)):
        return _single_call(hidden, weight, labels, loss_from_logprobs, shift, ignore_index, impl, filter_eps, design)
    logps = sequence_logprobs(
        hidden, weight, labels, shift=shift, ignore_index=ignore_index, impl=impl, filter_eps=filter_eps
    )
    return loss_from_logprobs(logps)


def _check_every_row_has_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> None:
    """A sequence with no target token has no log-prob: its logp would be 0 (probability 1), and
    NPO would silently add (2/beta) softplus(-beta ref) for it. Raise naming the rows instead."""
    empty = ((aligned_labels(labels, shift, ignore_index) != ignore_index).sum(-1) == 0).nonzero().flatten()
    if len(empty):
        rows = empty.tolist()
        raise ValueError(
            f"labels rows {rows} have no target token (all ignore_index{' after the shift' if shift else ''}): "
            "a sequence without targets has no log-prob; drop those rows"
        )


def ga_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    filter_eps="auto",
    design: str | None = None,
    fused=None,
) -> torch.Tensor:
    """Gradient-ascent loss: minus the token-mean cross-entropy over all target tokens of the batch.

    Equal to -(the `loss` a Hugging Face causal LM returns for these labels), so minimising it
    is gradient ascent on the targets. hidden [B, T, D] with shift=True ([..., D] without),
    labels aligned as in sequence_logprobs / token_logprobs. Raises if no token is a target.

    design, fused: as in npo_loss (default "two_call"); the single-call designs see every target
    token as its own sequence, so "one_pass" (valid: the loss is a sum over tokens) chunks by tokens.
    """
    check_hidden_and_weight(hidden, weight, exact_dim=3 if shift else None)
    check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index)
    design = resolve_design(design, fused, "two_call")
    targets = aligned_labels(labels, shift, ignore_index) if shift else labels.long()
    count = int((targets != ignore_index).sum())
    if count == 0:
        raise ValueError("labels has no target token (all are ignore_index): the token-mean loss is undefined")

    def loss_from_logprobs(logps):
        return logps.sum() / count

    dim = hidden.shape[-1]
    if design != "two_call":
        return _single_call(
            hidden.reshape(-1, 1, dim),
            weight,
            targets.reshape(-1, 1),
            loss_from_logprobs,
            False,
            ignore_index,
            impl,
            filter_eps,
            design,
        )
    return (
        token_logprobs_flat(hidden.reshape(-1, dim), weight, targets.reshape(-1), ignore_index, impl, filter_eps).sum()
        / count
    )


def _single_call(hidden, weight, labels, loss_from_logprobs, shift, ignore_index, impl, filter_eps, design):
    batch, length, dim = hidden.shape
    targets = aligned_labels(labels, shift, ignore_index)
    return fused_sequence_loss(
        hidden.reshape(batch * length, dim),
        weight,
        targets.reshape(-1),
        length,
        loss_from_logprobs,
        ignore_index=ignore_index,
        impl=impl,
        filter_eps=filter_eps,
        design=design,
    )
