"""Autograd functions and the choice of implementation for fused linear + log-softmax log-probs.

Two backends share one interface (see kernels.logprobs_forward / logprobs_backward):
    forward(hidden2d, weight, row_ids, labels) -> (lse, target_logit)      fp32 [n]
    backward(..., lse, grad, filter_eps, compute_dh, compute_dw) -> (dh, dw) fp32
"triton" runs the kernels in kernels/, "torch" the vocabulary-chunked code in chunked.py.
Rows whose label is ignore_index are dropped before either backend runs (prompts and
padding often make up most of a batch), and their log-prob is exactly 0.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chunked import chunked_backward, chunked_forward
from .reference import naive_token_logprobs

IMPLS = ("auto", "triton", "torch", "naive")


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable


def _triton_backend() -> Backend:
    try:
        from .kernels.logprobs_backward import logprobs_backward
        from .kernels.logprobs_forward import logprobs_forward
    except ImportError as error:  # triton missing (macOS, Windows) or broken
        raise RuntimeError(f"impl='triton' needs the triton package: {error}") from error
    return Backend("triton", logprobs_forward, logprobs_backward)


TORCH_BACKEND = Backend("torch", chunked_forward, chunked_backward)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation for `impl` on `device` ("auto": triton on CUDA, torch elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing fastnpo, or use impl='torch'"
        )
    return impl


def backend_for(impl: str) -> Backend:
    return _triton_backend() if impl == "triton" else TORCH_BACKEND


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    """Gradient-filter threshold. "auto": 2**-12 for bf16 / fp16 (a sixteenth of bf16's
    precision), exact for fp32. None or 0: exact."""
    if filter_eps is None:
        return 0.0
    if filter_eps == "auto":
        return 2.0**-12 if dtype in (torch.bfloat16, torch.float16) else 0.0
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not 0 <= filter_eps < 1:
        raise ValueError(f"filter_eps must be 'auto', None or a number in [0, 1), got {filter_eps!r}")
    return float(filter_eps)


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
