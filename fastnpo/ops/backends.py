"""The implementations of the fused op and the choice between them.

A backend computes, for the kept rows of hidden [N, D] (row_ids) and their labels,
    forward(hidden, weight, row_ids, labels) -> (lse, target_logit)                     fp32 [n]
    backward(..., lse, grad, *, filter_eps, compute_dh, compute_dw) -> (dh [n, D], dw [V, D])  fp32
"triton" runs the kernels in kernels/ (fastnpo.kernels), "torch" the vocabulary-chunked code in
chunked.py (fp32, the CPU path), "split" (experimental, experimental/split.py) the gradients from
library matmuls (low-precision operands, fp32 accumulation, no atomics), fed where Triton runs (CUDA,
or the interpreter) by the Triton forward and softmax-gradient kernels, elsewhere by vocabulary blocks
of torch ops; "naive" (full logits, naive.py) has no backend: it is plain autograd. dh and dw may
come back in fp32 or in the input's dtype. Which is production: ops/DESIGNS.md. "cublas" is the
deprecated name of "split" (one release, with a DeprecationWarning).
"""

import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from .chunked import chunked_backward, chunked_forward
from .experimental.split import split_backward, split_forward
from .matmuls import triton_runs_on

# The accepted impl names; the last, "cublas", is the deprecated spelling of "split" (one release).
IMPLS = ("auto", "triton", "torch", "split", "naive", "cublas")
DEPRECATED_IMPLS = {"cublas": "split"}


class ForwardFn(Protocol):
    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, row_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class BackwardFn(Protocol):
    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        row_ids: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        grad: torch.Tensor,
        *,
        filter_eps: float,
        compute_dh: bool,
        compute_dw: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Backend:
    name: str
    forward: ForwardFn
    backward: BackwardFn


def _triton_backend() -> Backend:
    try:
        from ..kernels.logprobs_backward import logprobs_backward
        from ..kernels.logprobs_forward import logprobs_forward
    except ImportError as error:  # triton missing (macOS, Windows) or broken
        raise RuntimeError(f"impl='triton' needs the triton package: {error}") from error
    return Backend("triton", logprobs_forward, logprobs_backward)


TORCH_BACKEND = Backend("torch", chunked_forward, chunked_backward)
SPLIT_BACKEND = Backend("split", split_forward, split_backward)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation for `impl` on `device` ("auto": triton on CUDA, torch elsewhere;
    "cublas": "split", with a DeprecationWarning)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in DEPRECATED_IMPLS:
        new = DEPRECATED_IMPLS[impl]
        warnings.warn(
            f"impl={impl!r} is deprecated and will be removed in the next release: use impl={new!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        impl = new
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing fastnpo, or use impl='torch'"
        )
    return impl


def backend_for(impl: str) -> Backend:
    if impl == "triton":
        return _triton_backend()
    if impl in DEPRECATED_IMPLS:
        impl = DEPRECATED_IMPLS[impl]
    return SPLIT_BACKEND if impl == "split" else TORCH_BACKEND


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
