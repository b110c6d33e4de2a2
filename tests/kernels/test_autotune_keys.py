"""Every autotuner keys on every constexpr that changes its kernel's work.

Triton's autotuner caches one config per key: a constexpr left out of the key (FILTER, COMPUTE_DH,
COMPUTE_DW, ...) makes a launch with another value of it reuse a config timed for different work
(the exact backward inherited the filtered backward's tiles). A key name that is not a kernel
parameter is silently ignored by the autotuner, so a misspelling is caught too. The kernels are
found by walking fastnpo.kernels, so a new kernel or a new flag cannot be forgotten.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import triton.language as tl
from triton.runtime.autotuner import Autotuner

import fastnpo.kernels


def autotuners() -> list[tuple[str, Autotuner]]:
    found = []
    for info in pkgutil.iter_modules(fastnpo.kernels.__path__):
        module = importlib.import_module(f"fastnpo.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found.append((f"{info.name}.{name}", value))
    return sorted(found, key=lambda item: item[0])


def python_function(autotuner: Autotuner):
    fn = autotuner.fn
    while not inspect.isfunction(fn):  # JITFunction / InterpretedFunction / heuristics wrap it
        fn = fn.fn
    return fn


def constexpr_parameters(autotuner: Autotuner) -> list[str]:
    def is_constexpr(annotation) -> bool:
        if isinstance(annotation, str):
            return annotation.split(".")[-1] == "constexpr"
        return annotation is tl.constexpr

    parameters = inspect.signature(python_function(autotuner)).parameters.values()
    return [p.name for p in parameters if is_constexpr(p.annotation)]


AUTOTUNERS = autotuners()


def test_every_kernel_module_is_walked():
    names = {name.split(".")[0] for name, _ in AUTOTUNERS}
    assert {"logprobs_forward", "logprobs_backward", "softmax_gradient"} <= names, names


@pytest.mark.parametrize("name,autotuner", AUTOTUNERS, ids=[name for name, _ in AUTOTUNERS])
def test_key_holds_every_constexpr_a_config_does_not_set(name, autotuner):
    set_by_configs = {key for config in autotuner.configs for key in config.all_kwargs()}
    constexprs = constexpr_parameters(autotuner)
    assert constexprs, f"{name}: no constexpr parameters found (annotation not recognised?)"
    missing = [c for c in constexprs if c not in set_by_configs and c not in autotuner.keys]
    assert not missing, f"{name}: constexprs {missing} change the kernel's work but are not in its autotune key"


@pytest.mark.parametrize("name,autotuner", AUTOTUNERS, ids=[name for name, _ in AUTOTUNERS])
def test_key_names_are_kernel_parameters(name, autotuner):
    # Autotuner.run skips key names that are not arguments: a typo would silently key on nothing.
    unknown = [k for k in autotuner.keys if k not in autotuner.arg_names]
    assert not unknown, f"{name}: autotune key names {unknown} are not parameters of the kernel"


def test_backward_key_separates_exact_and_filtered():
    from fastnpo.kernels.logprobs_backward import logprobs_backward_kernel

    assert {"FILTER", "COMPUTE_DH", "COMPUTE_DW"} <= set(logprobs_backward_kernel.keys)
