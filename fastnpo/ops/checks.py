"""Input checks for the public API: a clear exception that names the argument, before any work."""

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Checks of VALUES (finite, >= 0, > 0) read tensors on the host: on a GPU each is a device sync.
# A caller that validated its values once (the trainer: the reference cache when it is loaded, the
# example weights when they are read, the token counts from the tokenized examples) turns them off
# for its steps; the checks of types, shapes and devices stay.
_VALUE_CHECKS = ContextVar("fastnpo_value_checks", default=True)


@contextmanager
def values_checked_by_caller():
    """Within it, the per-sequence inputs' VALUE checks (which sync a GPU) are skipped."""
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_on() -> bool:
    return _VALUE_CHECKS.get()


def check_hidden_and_weight(hidden, weight, *, min_dim: int = 1, exact_dim: int | None = None) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if exact_dim is not None and hidden.dim() != exact_dim:
        raise ValueError(f"hidden must have {exact_dim} dimensions, got shape {tuple(hidden.shape)}")
    if hidden.dim() < min_dim:
        raise ValueError(f"hidden must have at least {min_dim} dimension(s), got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden_dim], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has hidden_dim {weight.shape[1]} but hidden's last dimension is {hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")


def check_labels(labels, shape: torch.Size, device: torch.device, vocab_size: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal {tuple(shape)} (hidden without its last dim)"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {device}")
    if labels.numel():
        # One reduction (one device sync) for both bounds.
        outside = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
        if bool(outside.any()):
            bad = labels[outside][0].item()
            raise ValueError(
                f"labels contains {bad}, outside [0, {vocab_size}) and not ignore_index={ignore_index}"
            )


def check_positive(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_finite_number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_per_sequence(name: str, value, batch_size: int, device: torch.device, *, nonnegative: bool = False):
    """A per-sequence float vector [B] (ref_logps, weights); returns it as fp32 on `device`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch_size}], got {type(value).__name__}")
    if value.shape != (batch_size,):
        raise ValueError(
            f"{name} must have shape [{batch_size}] (one per sequence), got {tuple(value.shape)}"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")
    if not value_checks_on():
        return value.float()
    if batch_size and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if nonnegative and batch_size and bool((value < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    return value.float()
