"""Autograd functions of the fused linear + log-softmax log-probs, over a backend (backends.py).

Rows whose label is ignore_index are dropped before any backend runs (prompts and padding
often make up most of a batch), and their log-prob is exactly 0.
"""

from collections.abc import Callable

import torch

from .backends import Backend, backend_for, resolve_filter_eps, resolve_impl
from .naive import naive_token_logprobs


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

    The loss needs nothing but the per-sequence log-probs (reference log-probs are cached),
    so its gradient with respect to every token's log-prob is known as soon as the forward
    is done: the backward kernel runs right away and autograd's backward only scales the
    stored gradients. The log-sum-exp must be complete before any probability is known, so
    this is still two sweeps over the vocabulary; what fusing saves is the saved-for-backward
    state and one autograd round trip (benchmarks/ measures whether that pays).
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
        backend: Backend,
        filter_eps: float,
        want_grads: bool,
    ):
        lse, target = backend.forward(hidden, weight, row_ids, labels)
        token_logps = target - lse
        sequence_logps = token_logps.new_zeros(num_sequences).index_add_(0, sequence_ids, token_logps)
        with torch.enable_grad():
            leaf = sequence_logps.detach().requires_grad_()
            loss = loss_from_logprobs(leaf)
        if not want_grads:
            return loss.detach()
        (grad_sequence,) = torch.autograd.grad(loss, leaf)
        dh, dw = backend.backward(
            hidden,
            weight,
            row_ids,
            labels,
            lse,
            grad_sequence[sequence_ids].contiguous(),
            filter_eps=filter_eps,
            compute_dh=hidden.requires_grad,
            compute_dw=weight.requires_grad,
        )
        ctx.consumed = False
        ctx.dh = _scatter_rows(dh, row_ids, hidden)
        ctx.dw = dw.to(weight.dtype) if dw is not None else None
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("a fused loss can be back-propagated once; use fused=False to backward twice")
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None  # used once, so they can be scaled in place: no second [V, D] copy
        ctx.consumed = True
        if not bool(grad_loss == 1):
            dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
            dw = dw.mul_(grad_loss.to(dw.dtype)) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """loss_from_logprobs(summed per-sequence log-probs) for hidden [B*T, D], labels [B*T] (already
    aligned: labels[i] is predicted by hidden[i]), gradients computed in the same call."""
    impl = resolve_impl(impl, hidden.device)
    num_sequences = labels.shape[0] // sequence_length
    if impl == "naive":
        token_logps = naive_token_logprobs(hidden, weight, labels, ignore_index)
        return loss_from_logprobs(token_logps.view(num_sequences, sequence_length).sum(dim=1))
    row_ids = kept_rows(labels, ignore_index)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return FusedSequenceLossFunction.apply(
        hidden,
        weight,
        row_ids,
        labels[row_ids].contiguous(),
        row_ids // sequence_length,
        num_sequences,
        loss_from_logprobs,
        backend_for(impl),
        resolve_filter_eps(filter_eps, hidden.dtype),
        want_grads,
    )
