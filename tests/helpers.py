"""What test modules share: `from helpers import ...` (tests/ is on sys.path, as pytest puts the
folder of the root conftest.py there). conftest.py holds the setup and the fixtures."""

import contextlib
from pathlib import Path

import torch

from fastnpo.ops.matmuls import Matmuls

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
    `step`-th step; fastnpo.train.trainer.Trainer.step is restored on leaving."""
    from fastnpo.train.trainer import Trainer

    real_step, calls = Trainer.step, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    Trainer.step = stop
    try:
        yield
    finally:
        Trainer.step = real_step


# The single-sweep designs' tests (test_one_pass.py, test_fused_epilogue.py) share their references.
IGNORE_INDEX = -100


def token_logprobs_plain(hidden, weight, labels, logits_dtype):
    """log softmax(hidden @ weight.T)[labels], 0 where ignored, through full logits in logits_dtype
    (float64: the reference; the inputs' dtype upcast to fp32 for the softmax: plain torch)."""
    logits = (hidden @ weight.T).to(logits_dtype)
    ignored = labels == IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(1, labels.masked_fill(ignored, 0)[:, None])[:, 0]
    return picked.masked_fill(ignored, 0.0)


def sequence_logprobs_plain(hidden, weight, labels, t, logits_dtype):
    """Summed log-probs per sequence of t positions, as token_logprobs_plain computes them."""
    return token_logprobs_plain(hidden, weight, labels, logits_dtype).view(-1, t).sum(dim=1)


def value_and_grads(fn, hidden, weight, upstream=1.0, hidden_grad=True, weight_grad=True):
    """fn(h, w) on fresh leaf copies, its backward times upstream: (value, dH, dW)."""
    h = hidden.detach().clone().requires_grad_(hidden_grad)
    w = weight.detach().clone().requires_grad_(weight_grad)
    loss = fn(h, w)
    if loss.requires_grad:
        (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def fused_loss_fn(labels, t, loss_fn, chunk_bytes, design: str):
    """(h, w) -> fused_sequence_loss(..., design=design) of loss_fn over sequences of t positions."""
    from fastnpo.ops import fused_sequence_loss

    return lambda h, w: fused_sequence_loss(
        h,
        w,
        labels,
        t,
        loss_fn,
        ignore_index=IGNORE_INDEX,
        impl="auto",
        filter_eps=None,
        design=design,
        chunk_bytes=chunk_bytes,
    )


def multi_node_torchrun(*, nnodes, node_rank, nproc_per_node, rdzv_endpoint, rdzv_id) -> list[str]:
    """torchrun's options for one node of a multi-node job joined by a c10d rendezvous: what
    tests/train/test_hybrid_sharding.py launches each of its two "nodes" with, and what
    docs/multi_node.md and docs/launch/fastnpo_2x8.sbatch give (tests/train/test_launch.py checks
    that they agree). torchrun assigns the node ranks at a c10d rendezvous (it ignores --node_rank
    there, with a warning); every node's processes still get contiguous ranks."""
    return [
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rdzv_endpoint}",
        f"--rdzv_id={rdzv_id}",
    ]


REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(tiny, out, **extra) -> list[str]:
    """`key=value` overrides of configs/tiny_cpu.yaml for a short run on the session's `tiny`
    (conftest): batches of 4, 64 tokens, 2 steps at lr 1e-3, no checkpoints, no progress bar."""
    values = {
        "model.name_or_path": tiny["base"],
        "data.forget": tiny["data"],
        "data.retain": tiny["data"],
        "data.batch_size": 4,
        "data.retain_batch_size": 4,
        "data.max_length": 64,
        "run.output_dir": out,
        "run.progress": False,
        "run.checkpoint_every": 0,
        "optim.lr": 1e-3,
        "optim.max_steps": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(tiny, out, **extra):
    """The trainer's Config of tiny_overrides."""
    from fastnpo.train.config import load_config

    return load_config(REPO / "configs" / "tiny_cpu.yaml", tiny_overrides(tiny, out, **extra))


aten = torch.ops.aten
# Ops whose result size or value must come to the host: a device sync on CUDA (the budget tests
# count them).
SYNCING_OPS = {
    aten._local_scalar_dense,
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.bincount,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.unique_dim,
    aten.repeat_interleave,
}


def tiny_alternates(tiny) -> Path:
    """AltPO's alternate answers for every question of the session's Mini-TOFU (the data.alternate
    layout: question, answer, alternate), written once beside its data folder: each question's
    alternate is the answer of the next row, a fluent answer with other facts."""
    import json

    data = Path(tiny["data"])
    path = data.parent / "alternates.jsonl"
    if not path.exists():
        rows = {}
        for split in sorted(data.glob("*.jsonl")):
            for line in split.read_text().splitlines():
                row = json.loads(line)
                if "question" in row and "answer" in row:
                    rows.setdefault(row["question"], row["answer"])
        questions = list(rows)
        lines = [
            json.dumps({"question": q, "answer": rows[q], "alternate": rows[questions[(i + 1) % len(questions)]]})
            for i, q in enumerate(questions)
        ]
        path.write_text("".join(line + "\n" for line in lines))
    return path


class LowPrecisionOperands(Matmuls):
    """The CUDA path's matmuls, emulated on CPU (where torch.mm has no out_dtype): bf16 / fp16
    operands with fp32 results, so the dlogits are written in the input's dtype and dW is accumulated
    by addmm_ in it, as cuBLAS does on the GPU (monkeypatch it over one_pass.Matmuls)."""

    def __init__(self, like):
        self.mode, self.dtype = "out_dtype", like.dtype

    def mm(self, a, b):
        return a.float() @ b.float()
