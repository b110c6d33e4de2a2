"""Checkpoints through torch.distributed.checkpoint (sharded; bit-exact resume) and the final
Hugging Face export."""

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..distributed import ProcessInfo, barrier


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _interrupts_pass_through():
    """DCP turns whatever a rank raises, Ctrl-C's KeyboardInterrupt included, into a
    CheckpointException (a BaseException whose message is a traceback per rank): an interrupt
    on any rank comes out as a KeyboardInterrupt again (the save is left as .partial_step_N,
    which the next save replaces and no resume reads)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        if any(_interrupted(failure[0]) for failure in error.failures.values()):
            raise KeyboardInterrupt from error
        raise


def _interrupted(error: BaseException | None, depth: int = 0) -> bool:
    """Whether a KeyboardInterrupt is `error` or what it was raised from or during: one that lands
    inside torch.save's zip writer surfaces as the writer's RuntimeError ("unexpected pos") on exit."""
    if error is None or depth > 8:
        return False
    if isinstance(error, KeyboardInterrupt):
        return True
    return _interrupted(error.__cause__, depth + 1) or _interrupted(error.__context__, depth + 1)


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory` (a checkpoint is complete once renamed)."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name.split("_")[1]) for p in directory.glob("step_*") if (p / "trainer.json").exists()
    )


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer,
    trainer_state: dict,
    info: ProcessInfo,
    keep: int = 2,
) -> Path:
    """Model + optimizer through torch.distributed.checkpoint (sharded, every rank writes its
    part), trainer state and each rank's RNG. Written under a temporary name and renamed by
    rank 0 when every rank is done, so a kill mid-save leaves the previous checkpoint usable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = directory / f"step_{step}"
    partial = directory / f".partial_step_{step}"
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(info)
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings(), _interrupts_pass_through():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (partial / "trainer.json").write_text(json.dumps(_json_tensors(trainer_state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoint_steps(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, info: ProcessInfo) -> dict:
    """Restore what save_checkpoint wrote; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings(), _interrupts_pass_through():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{info.rank}.pt"
    if not rng_file.exists():
        raise ValueError(
            f"checkpoint {path} has no RNG state for rank {info.rank}: saved with another world size?"
        )
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer.json").read_text(), object_hook=_tensor_from_json)


# Tensors in the trainer state: torchao's AdamW8bit keeps each group's lr as a 0-dim tensor, so the
# scheduler's state_dict holds base_lrs: [tensor(0.001)]. Written with their dtype and read back as
# the same tensors (on the CPU), so a resumed run computes its learning rates bit for bit as before.
TENSOR_KEY = "__tensor__"


def _json_tensors(value):
    if isinstance(value, torch.Tensor):
        return {TENSOR_KEY: value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {key: _json_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_tensors(item) for item in value]
    return value


def _tensor_from_json(value: dict):
    if TENSOR_KEY in value:
        return torch.tensor(value[TENSOR_KEY], dtype=getattr(torch, value["dtype"]))
    return value


def full_state_dict(model: nn.Module) -> dict:
    """Unsharded CPU state dict (on every rank; only rank 0 should write it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_run_state(
    directory: Path, step: int, model: nn.Module, optimizer, scheduler, batches, info: ProcessInfo, *, keep: int
) -> None:
    """Everything a resume needs: weights, optimizer, scheduler, data position (RNG: save_checkpoint)."""
    state = {"step": step, "scheduler": scheduler.state_dict(), "batches": batches.state_dict()}
    save_checkpoint(directory, step, model, optimizer, state, info, keep=keep)


def resume_run_state(path: Path, model: nn.Module, optimizer, scheduler, batches, info: ProcessInfo) -> int:
    """Restore what save_run_state wrote; returns the step to continue from."""
    state = load_checkpoint(path, model, optimizer, info)
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["batches"])
    return state["step"]


def hf_state_dict(wrapper: nn.Module) -> dict:
    """full_state_dict of a SequenceLogprobModel keyed like the Hugging Face model it wraps
    (every rank: a collective)."""
    return {k.removeprefix("lm."): v for k, v in full_state_dict(wrapper).items()}


def export_hf(wrapper: nn.Module, model: nn.Module, tokenizer, path: Path, info: ProcessInfo, *, lora: bool) -> None:
    """A Hugging Face folder (safetensors) that from_pretrained loads; LoRA runs save the adapter.
    Every rank gathers the full state dict (a collective); rank 0 writes, then renames."""
    state = hf_state_dict(wrapper)
    if not info.is_main:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(model, state_dict=state)
        model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # transformers writes the weights through a private temp file (mode 0600); they should be as
    # readable as the rest of the folder.
    umask = os.umask(0)
    os.umask(umask)
    for file in tmp.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
