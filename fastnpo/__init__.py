"""fastnpo: fast, memory-lean LLM unlearning.

Fused linear + log-softmax log-probs (no [tokens x vocab] logits), the NPO family of losses,
and the tools around them.

The public functions are imported on first use (module __getattr__): importing the package
must not import torch, so that `fastnpo --help` answers in well under a second.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "dpo_from_logprobs": "losses",
    "ga_from_logprobs": "losses",
    "ga_loss": "losses",
    "nll_from_logprobs": "losses",
    "npo_from_logprobs": "losses",
    "npo_loss": "losses",
    "simnpo_from_logprobs": "losses",
    "sequence_logprobs": "ops",
    "token_logprobs": "ops",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        # `import fastnpo; fastnpo.losses` worked when the package imported its submodules eagerly.
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted({*globals(), *_LAZY})
