"""Autograd functions of the fused linear + log-softmax log-probs, over a backend (backends.py), and
of a loss of per-sequence log-probs with its gradients computed in the forward call (designs.py:
"two_sweep" over a backend, "one_pass" over chunks of whole sequences (one_pass.py), and the
experimental "epilogue").

Rows whose label is ignore_index are dropped before any backend runs (prompts and padding
often make up most of a batch), and their log-prob is exactly 0.
"""

import functools
from collections.abc import Callable

import torch

from . import one_pass
from .backends import Backend, backend_for, resolve_filter_eps, resolve_impl
from .ce_u import ce_u_token_losses
from .checks import check_hidden_and_weight
from .designs import resolve_design
from .experimental.epilogue import check_device, epilogue_sequence_loss
from .naive import naive_token_logprobs
from .one_pass import one_pass_sequence_loss
from .transfer import to_device


def _scatter_rows(compact: torch.Tensor | None, row_ids: torch.Tensor, like: torch.Tensor):
    if compact is None:
        return None
    return like.new_zeros(like.shape).index_copy_(0, row_ids, compact.to(like.dtype))


class TokenLogprobsFunction(torch.autograd.Function):
    """logp[i] = log softmax(hidden[row_ids[i]] @ weight.T)[labels[i]] for the kept rows."""

    @staticmethod
    def forward(ctx, hidden, weight, row_ids, labels, backend: Backend, filter_eps: float):
        lse, target = backend.forward(hidden, weight, row_ids, labels)
        ctx.save_for_backward(hidden, weight, row_ids, labels, lse)
        ctx.backend, ctx.filter_eps = backend, filter_eps
        return target - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, row_ids, labels, lse = ctx.saved_tensors
        dh, dw = ctx.backend.backward(
            hidden,
            weight,
            row_ids,
            labels,
            lse,
            grad.float().contiguous(),
            filter_eps=ctx.filter_eps,
            compute_dh=ctx.needs_input_grad[0],
            compute_dw=ctx.needs_input_grad[1],
        )
        dw = dw.to(weight.dtype) if dw is not None else None
        return _scatter_rows(dh, row_ids, hidden), dw, None, None, None, None


class FusedSequenceLossFunction(torch.autograd.Function):
    """A loss of per-sequence log-probs, with its gradients produced in the forward call.

    The loss needs nothing but the per-sequence log-probs (reference log-probs are cached), so its
    gradient with respect to every token's log-prob is known as soon as the log-probs are: `design`
    computes the loss and both gradients at once and autograd's backward only scales the stored
    gradients. Three designs, all (hidden, weight, row_ids, labels, sequence_ids, num_sequences,
    loss_from_logprobs, *, compute_dh, compute_dw) -> (loss, dH [N, D] or None, dW [V, D] or None):
    two_sweep_sequence_loss (design="two_sweep", any loss), one_pass.one_pass_sequence_loss
    (design="one_pass", separable losses only) and experimental.epilogue.epilogue_sequence_loss
    (design="epilogue", separable losses only, Triton).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        row_ids,
        labels,
        sequence_ids,
        num_sequences: int,
        loss_from_logprobs: Callable,
        design: Callable,
        compute_dh: bool,
        compute_dw: bool,
        upstream_is_one: bool = False,
    ):
        loss, dh, dw = design(
            hidden,
            weight,
            row_ids,
            labels,
            sequence_ids,
            num_sequences,
            loss_from_logprobs,
            compute_dh=compute_dh,
            compute_dw=compute_dw,
        )
        ctx.consumed = False
        ctx.dh, ctx.dw, ctx.upstream_is_one = dh, dw, upstream_is_one
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("a fused loss can be back-propagated once; use design='two_call' to backward twice")
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None  # used once, so they can be scaled in place: no second [V, D] copy
        ctx.consumed = True
        # upstream_is_one: the caller back-propagates this loss alone (the trainer), so the check
        # below, a device sync, is skipped.
        if not ctx.upstream_is_one and not bool(grad_loss == 1):
            dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
            dw = dw.mul_(grad_loss.to(dw.dtype)) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None, None


def two_sweep_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_ids: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    loss_from_logprobs: Callable,
    *,
    compute_dh: bool,
    compute_dw: bool,
    backend: Backend,
    filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """design="two_sweep": the backend's forward, then its backward with the loss's gradient.

    The log-sum-exp must be complete before any probability is known, so this is still two sweeps
    over the vocabulary (8NDV with the backward's recompute); what fusing saves is the
    saved-for-backward state and one autograd round trip (benchmarks/ measures whether that pays).
    """
    lse, target = backend.forward(hidden, weight, row_ids, labels)
    token_logps = target - lse
    sequence_logps = token_logps.new_zeros(num_sequences).index_add_(0, sequence_ids, token_logps)
    with torch.enable_grad():
        leaf = sequence_logps.detach().requires_grad_()
        loss = loss_from_logprobs(leaf)
    if not (compute_dh or compute_dw):
        return loss.detach(), None, None
    (grad_sequence,) = torch.autograd.grad(loss, leaf)
    dh, dw = backend.backward(
        hidden,
        weight,
        row_ids,
        labels,
        lse,
        grad_sequence[sequence_ids].contiguous(),
        filter_eps=filter_eps,
        compute_dh=compute_dh,
        compute_dw=compute_dw,
    )
    return loss.detach(), _scatter_rows(dh, row_ids, hidden), dw.to(weight.dtype) if dw is not None else None


IGNORE_ROW = -1  # example_loss's label of rows that belong to no example (never a token id)


def kept_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 indices of the rows whose label is a real target."""
    return (labels != ignore_index).nonzero()[:, 0]


def token_logprobs_flat(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, impl: str, filter_eps
) -> torch.Tensor:
    """fp32 [N] log-probs for hidden [N, D], labels [N] (validated by the caller)."""
    impl = resolve_impl(impl, hidden.device)
    if impl == "naive":
        return naive_token_logprobs(hidden, weight, labels, ignore_index)
    row_ids = kept_rows(labels, ignore_index)
    logps = TokenLogprobsFunction.apply(
        hidden,
        weight,
        row_ids,
        labels[row_ids].contiguous(),
        backend_for(impl),
        resolve_filter_eps(filter_eps, hidden.dtype),
    )
    return logps.new_zeros(labels.shape[0]).index_copy(0, row_ids, logps)


def fused_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sequence_length: int,
    loss_from_logprobs: Callable[[torch.Tensor], torch.Tensor],
    *,
    ignore_index: int,
    impl: str,
    filter_eps,
    design: str | None = None,
    chunk_bytes: int | None = None,
    fused=None,
) -> torch.Tensor:
    """loss_from_logprobs(summed per-sequence log-probs) for hidden [B*T, D], labels [B*T] (already
    aligned: labels[i] is predicted by hidden[i]).

    design (designs.py; default "two_sweep"): "two_sweep" computes the gradients in the same call over
    the `impl` backend (two sweeps over the vocabulary; any loss); "one_pass" in the same call in one
    sweep of chunks of whole sequences (one_pass.py: library matmuls, exact, `impl` and filter_eps
    unused but impl="naive"), valid ONLY for a loss that is a sum of per-sequence terms, which the
    caller vouches for; "two_call" runs the token log-probs, then autograd through the loss.
    impl="naive" is always the two-call path over full logits. "epilogue" (experimental) is
    one_pass's contract (separable losses, impl and filter_eps unused but impl="naive") through
    Triton GEMMs whose epilogue keeps per-tile softmax statistics (experimental/epilogue.py; CUDA
    tensors or TRITON_INTERPRET=1, else ValueError). fused: the deprecated spelling (False, True,
    "one_pass", "epilogue"; DeprecationWarning). chunk_bytes: the one-pass design's fp32 logits per
    chunk (default one_pass's rule), the epilogue design's E (operand dtype) per chunk (default
    experimental.epilogue.CHUNK_BYTES).
    """
    design = resolve_design(design, fused, "two_sweep")
    num_sequences = labels.shape[0] // sequence_length
    if design == "two_call" or resolve_impl(impl, hidden.device) == "naive":
        token_logps = token_logprobs_flat(hidden, weight, labels, ignore_index, impl, filter_eps)
        return loss_from_logprobs(token_logps.view(num_sequences, sequence_length).sum(dim=1))
    row_ids = kept_rows(labels, ignore_index)
    return _fused_loss(
        hidden,
        weight,
        row_ids,
        labels[row_ids].contiguous(),
        row_ids // sequence_length,
        num_sequences,
        loss_from_logprobs,
        design=design,
        impl=impl,
        filter_eps=filter_eps,
        chunk_bytes=chunk_bytes,
    )


def example_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    owner: torch.Tensor,
    num_examples: int,
    loss_from_logprobs: Callable[[torch.Tensor], torch.Tensor],
    *,
    impl: str = "auto",
    filter_eps=None,
    design: str | None = None,
    chunk_bytes: int | None = None,
    upstream_is_one: bool = False,
    token_level: bool = False,
    token_values: str = "logprob",
    groups: torch.Tensor | None = None,
    fused=None,
) -> torch.Tensor:
    """fused_sequence_loss for rows of any layout: hidden [N, D], targets [N] (aligned: targets[i]
    is predicted by hidden[i]), owner [N] the example (< num_examples) each target belongs to, -1
    where a row has none (prompt, padding, a packed row's boundary). The log-probs handed to
    loss_from_logprobs are each example's sum. The kept rows' owners must be nondecreasing
    (padded rows: the row's number; packed rows: examples numbered row-major, as
    data.collate_packed numbers them): the one-pass designs chunk whole examples in that order.
    groups: int64 [num_examples], the group (>= 0) of each example, for a loss that is a sum of
    per-GROUP terms (DPO's pairs: a forget answer and its winner in one term): design "one_pass"
    then chunks whole groups in group order (its rows gathered in that order, owners in any order),
    so each term's examples are complete when its gradient is taken; found on the host (a device
    groups or owner is copied there: one sync). Designs "two_call" and "two_sweep" need no grouping
    (they see every log-prob before any gradient) and ignore it; "epilogue" refuses it.
    owner may be a host tensor while hidden is on a GPU: the kept rows and the one-pass chunks are
    then found on the host, and the call makes no device sync of its own. upstream_is_one: the
    caller promises to back-propagate this loss alone (loss.backward(), upstream gradient 1): the
    backward then returns the stored gradients without checking the upstream value (a sync).
    design: as in fused_sequence_loss, default "one_pass" (fused: its deprecated spelling).
    token_level: the loss is loss_from_logprobs(per-example log-probs [E], token log-probs [N], 0
    where a row has no example), a sum of per-example AND per-token terms (a token-weighted mean
    with detached weights); designs "one_pass" and "two_call" only. token_values: what the per-token
    values are, "logprob" (the token log-probs) or "ce_u" (CE-U's per-token loss, ce_u_token_losses;
    one_pass_sequence_loss computes it and its gradient from two more row statistics).
    The trainer's one-pass route (train/step.py) calls this inside the model's forward."""
    design = resolve_design(design, fused, "one_pass")
    _check_example_rows(hidden, weight, targets, owner, num_examples, loss_from_logprobs, groups)
    if groups is not None and design == "epilogue":
        raise ValueError("groups: design 'epilogue' chunks whole examples only; use design='one_pass'")
    if token_level and design not in ("one_pass", "two_call"):
        raise ValueError(f"token_level: a token-level loss runs in design 'one_pass' or 'two_call', got {design!r}")
    if token_values not in one_pass.TOKEN_VALUES:
        raise ValueError(f"token_values must be one of {one_pass.TOKEN_VALUES}, got {token_values!r}")
    if design == "two_call" or resolve_impl(impl, hidden.device) == "naive":
        owner = owner.to(hidden.device)
        unowned = torch.full_like(targets, IGNORE_ROW)
        kept = torch.where(owner >= 0, targets, unowned)
        token_logps = token_logprobs_flat(hidden, weight, kept, IGNORE_ROW, impl, filter_eps)
        sequence_logps = token_logps.new_zeros(num_examples).index_add(0, owner.clamp(min=0), token_logps)
        if not token_level:
            return loss_from_logprobs(sequence_logps)
        if token_values == "ce_u":
            return loss_from_logprobs(sequence_logps, ce_u_token_losses(hidden, weight, kept, ignore_index=IGNORE_ROW))
        return loss_from_logprobs(sequence_logps, token_logps)
    bounds = None
    if groups is not None and design == "one_pass":  # rows in group order, chunks of whole groups
        owner = owner.cpu()
        row_ids, sequence_ids, bounds = _grouped_rows(owner, groups.cpu(), weight.shape[0], chunk_bytes)
    else:
        row_ids = (owner >= 0).nonzero()[:, 0]
        sequence_ids = owner[row_ids]
    if owner.device.type == "cpu":  # found on the host: no device sync for the rows or the chunks
        if design == "one_pass" and bounds is None:
            vocab_size = weight.shape[0]
            budget = one_pass.chunk_budget(vocab_size, chunk_bytes)
            bounds = one_pass.chunk_rows(sequence_ids, num_examples, vocab_size, budget)
        row_ids, sequence_ids = to_device((row_ids, sequence_ids), hidden.device)
    loss_of_kept = loss_from_logprobs
    if token_level:  # the design sees the kept rows' per-token values; the caller's closure every row's
        every_row = hidden.shape[0]

        def loss_of_kept(sequence_logps, kept_values):
            every = kept_values.new_zeros(every_row).index_copy(0, row_ids, kept_values)
            return loss_from_logprobs(sequence_logps, every)

    return _fused_loss(
        hidden,
        weight,
        row_ids,
        targets[row_ids].contiguous(),
        sequence_ids.contiguous(),
        num_examples,
        loss_of_kept,
        design=design,
        impl=impl,
        filter_eps=filter_eps,
        chunk_bytes=chunk_bytes,
        bounds=bounds,
        upstream_is_one=upstream_is_one,
        token_level=token_level,
        token_values=token_values,
    )


def _grouped_rows(owner: torch.Tensor, groups: torch.Tensor, vocab_size: int, chunk_bytes):
    """(kept rows in group order, their examples, the one-pass chunk boundaries over whole groups),
    all on the host: a stable sort keeps each example's rows in order within its group."""
    row_ids = (owner >= 0).nonzero()[:, 0]
    units = groups[owner[row_ids]]
    order = torch.argsort(units, stable=True)
    row_ids, units = row_ids[order], units[order]
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    budget = one_pass.chunk_budget(vocab_size, chunk_bytes)
    bounds = one_pass.chunk_rows(units, num_groups, vocab_size, budget, unit="example group")
    return row_ids, owner[row_ids], bounds


def _check_example_rows(hidden, weight, targets, owner, num_examples, loss_from_logprobs, groups=None) -> None:
    """example_loss's arguments, without a device sync: shapes, dtypes and devices; owner's values
    (in range, kept rows in nondecreasing order unless grouped) only where owner is on the host;
    groups' shape and dtype, and its values where it is on the host."""
    check_hidden_and_weight(hidden, weight, exact_dim=2)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
    if not callable(loss_from_logprobs):
        raise TypeError(f"loss_from_logprobs must be callable, got {type(loss_from_logprobs).__name__}")
    for name, value in (("targets", targets), ("owner", owner)):
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an integer tensor [N], got {getattr(value, 'dtype', type(value).__name__)}"
            )
        if value.shape != hidden.shape[:1]:
            raise ValueError(
                f"{name} must have shape [{hidden.shape[0]}] (one per row of hidden), got {tuple(value.shape)}"
            )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if owner.device.type == "cpu" and owner.numel():
        kept = owner[owner >= 0]
        if kept.numel() and int(kept.max()) >= num_examples:
            raise ValueError(f"owner holds example {int(kept.max())}, but num_examples is {num_examples}")
        if groups is None and kept.numel() > 1 and bool((kept[1:] < kept[:-1]).any()):
            raise ValueError("owner: the kept rows' examples must be nondecreasing (whole examples in order)")
    elif owner.device != hidden.device:
        raise ValueError(f"owner is on {owner.device}: it must be on hidden's device ({hidden.device}) or the host")
    if groups is None:
        return
    if not isinstance(groups, torch.Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor [num_examples], got {getattr(groups, 'dtype', groups)!r}")
    if groups.shape != (num_examples,):
        raise ValueError(f"groups must have shape [{num_examples}] (one per example), got {tuple(groups.shape)}")
    if groups.device.type == "cpu" and groups.numel() and int(groups.min()) < 0:
        raise ValueError(f"groups must be >= 0, got {int(groups.min())}")


def _fused_loss(
    hidden,
    weight,
    row_ids,
    labels,
    sequence_ids,
    num_sequences,
    loss_from_logprobs,
    *,
    design,
    impl,
    filter_eps,
    chunk_bytes,
    bounds=None,
    upstream_is_one=False,
    token_level=False,
    token_values="logprob",
) -> torch.Tensor:
    """The loss over the kept rows (row_ids, their labels and sequences) through a single-call design;
    bounds: the one-pass design's chunk boundaries when the caller found them on the host;
    token_level, token_values: one_pass_sequence_loss's (the one-pass design only)."""
    impl = resolve_impl(impl, hidden.device)
    if design == "one_pass":
        run = functools.partial(
            one_pass_sequence_loss,
            chunk_bytes=chunk_bytes,
            bounds=bounds,
            token_level=token_level,
            token_values=token_values,
        )
    elif design == "epilogue":
        check_device(hidden.device)
        run = functools.partial(epilogue_sequence_loss, chunk_bytes=chunk_bytes)
    else:
        filter_eps = resolve_filter_eps(filter_eps, hidden.dtype)
        run = functools.partial(two_sweep_sequence_loss, backend=backend_for(impl), filter_eps=filter_eps)
    want_grads = torch.is_grad_enabled()
    return FusedSequenceLossFunction.apply(
        hidden,
        weight,
        row_ids,
        labels,
        sequence_ids,
        num_sequences,
        loss_from_logprobs,
        run,
        want_grads and hidden.requires_grad,
        want_grads and weight.requires_grad,
        upstream_is_one,
    )
