"""How a loss of per-sequence log-probs gets its gradients: the `design=` argument.

    "two_call"   the token log-probs (the `impl` backend's forward), then autograd through the loss
                 and the backend's backward: two calls, any loss, any number of backwards.
    "two_sweep"  the gradients computed inside the forward call over the `impl` backend: its forward,
                 the loss's gradient, its backward (two sweeps over the vocabulary, 8NDV); any loss;
                 one backward.
    "one_pass"   one sweep of chunks of whole sequences by library matmuls (one_pass.py: 6NDV, exact,
                 `impl` and filter_eps unused but impl="naive"); separable losses only; one backward.
    "epilogue"   one_pass's contract through Triton GEMMs whose epilogue keeps per-tile softmax
                 statistics (experimental/epilogue.py; CUDA or TRITON_INTERPRET=1); one backward.

Which of them (and of the `impl` backends) is production and which experimental, with what was
measured where: ops/DESIGNS.md. impl="naive" is always the two-call path over full logits.

`fused=` is the deprecated spelling (one release): False -> "two_call", True -> "two_sweep",
"one_pass" -> "one_pass", "epilogue" -> "epilogue".
"""

import warnings

DESIGNS = ("two_call", "two_sweep", "one_pass", "epilogue")

# The deprecated fused= values and the design each one spelled.
FUSED_TO_DESIGN = {False: "two_call", True: "two_sweep", "one_pass": "one_pass", "epilogue": "epilogue"}


def check_design(design) -> str:
    """design validated (ValueError naming it and the values)."""
    if isinstance(design, str) and design in DESIGNS:
        return design
    raise ValueError(
        f"design must be one of {DESIGNS}: 'two_call' (log-probs, then autograd), 'two_sweep' (gradients "
        "in the forward call, two sweeps over the vocabulary), 'one_pass' (one sweep; separable losses "
        f"only) or 'epilogue' (experimental, Triton; separable losses only), got {design!r}"
    )


def resolve_design(design: str | None, fused, default: str, *, stacklevel: int = 3) -> str:
    """The design a call asked for: `design`, else the deprecated `fused` (a DeprecationWarning naming
    the new spelling), else `default`. Both given: ValueError naming both. stacklevel: that of the
    public function's caller, where the warning points."""
    if fused is None:
        return default if design is None else check_design(design)
    if design is not None:
        raise ValueError(f"pass design= or the deprecated fused=, not both (got design={design!r}, fused={fused!r})")
    new = FUSED_TO_DESIGN.get(fused) if isinstance(fused, (bool, str)) else None
    if new is None:
        raise ValueError(
            f"fused (deprecated: use design=, one of {DESIGNS}) must be False, True, 'one_pass' or "
            f"'epilogue', got {fused!r}"
        )
    warnings.warn(
        f"fused={fused!r} is deprecated and will be removed in the next release: use design={new!r}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return new
