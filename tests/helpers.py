"""What test modules share: `from helpers import ...` (tests/ is on sys.path, as pytest puts the
folder of the root conftest.py there). conftest.py holds the setup and the fixtures."""

import contextlib

import torch

HAS_CUDA = torch.cuda.is_available()
# Triton tests: CUDA tensors with compiled kernels on a GPU machine, CPU tensors under the
# interpreter elsewhere (tiny shapes: the interpreter takes ~1 ms per program iteration).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def assert_as_good_as_torch(ours, same_dtype_torch, ref64, tol, what):
    """|ours - ref64| <= |torch in the same dtype - ref64| + tol * max(1, |ref64|) (max norms).

    The tolerance scales with the magnitude above 1: a bf16 gradient entry of size 8 is
    rounded to 1/16 on output alone, which an absolute 1e-2 could never accept.
    """
    err = (ours.double().cpu() - ref64.cpu()).abs().max().item()
    base = (same_dtype_torch.double().cpu() - ref64.cpu()).abs().max().item()
    allowed = base + tol * max(1.0, ref64.abs().max().item())
    assert err <= allowed, f"{what}: error {err:.3e} > torch's {base:.3e} + tolerance ({allowed:.3e})"


def build_tiny_llama(vocab_size: int, *, seed: int | None = None, **overrides):
    """A random tiny Llama (2 layers, hidden 32, GQA) in eval mode; overrides go to LlamaConfig.
    The one builder the test packages share (seed=None keeps the per-test seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    settings.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).float().eval()


@contextlib.contextmanager
def interrupted_in_step(step: int):
    """Inside: the trainer's loop raises KeyboardInterrupt (as Ctrl-C would) at the start of its
    `step`-th step; fastnpo.train.loop.train_step is restored on leaving."""
    from fastnpo.train import loop

    real_step, calls = loop.train_step, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    loop.train_step = stop
    try:
        yield
    finally:
        loop.train_step = real_step
