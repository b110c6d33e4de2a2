"""Checkpoints through torch.distributed.checkpoint (sharded; bit-exact resume) and the final
Hugging Face export.

Each checkpoint proves its integrity: checksums.json, written last inside the atomic rename,
records every file's size and sha256 (the ranks hash their shares in parallel). sha256 through
hashlib.file_digest costs 1.1-1.4 s per GB per core on this project's CPU machines, paid at each
checkpoint save, never in the training step. A resume verifies the newest checkpoint and falls
back to the previous intact one, naming the damaged file (resume_run_state)."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..distributed import ProcessInfo, all_gather_objects, barrier
from .config import ConfigError

CHECKSUMS = "checksums.json"


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
        if _in_chain(error, lambda e: isinstance(e, KeyboardInterrupt)):
            raise KeyboardInterrupt from error
        raise


def _in_chain(error: BaseException | None, match: Callable[[BaseException], bool], depth: int = 0) -> bool:
    """Whether `match` holds for `error`, for what it was raised from or during, or for a
    CheckpointException's per-rank failures, at any depth: DCP wraps what a rank raises, and a
    KeyboardInterrupt or a full disk inside torch.save's zip writer surfaces as the writer's
    RuntimeError ("unexpected pos") raised during it."""
    if error is None or depth > 8:
        return False
    if match(error):
        return True
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and any(_in_chain(f[0], match, depth + 1) for f in failures.values()):
        return True
    return _in_chain(error.__cause__, match, depth + 1) or _in_chain(error.__context__, match, depth + 1)


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory` (a checkpoint is complete once renamed)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in directory.glob("step_*") if (p / "trainer.json").exists())


@contextlib.contextmanager
def _no_space_said(folder: Path, state: dict, what: str = "the checkpoint"):
    """A full disk during a save, said as such: DCP reports it as a CheckpointException around the
    zip writer's "unexpected pos 704 vs 598", which never says "no space", and safetensors as a
    bare OSError. When the failure names ENOSPC, or the folder has less free space than this
    rank's share of the state, it becomes an OSError(ENOSPC) naming the folder and both sizes (the
    CLI's one-line error, exit 2)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, OSError, RuntimeError) as error:
        needed = sum(_local_bytes(t) for t in _tensors(state))
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        no_space = _in_chain(error, lambda e: isinstance(e, OSError) and e.errno == errno.ENOSPC)
        if not (no_space or free < needed):
            raise
        advice = (
            "free space there, or set run.checkpoint_every=0 (the last checkpoint and the export stay)"
            if what == "the checkpoint"
            else "free space there and run again: it resumes from the run's last checkpoint, if it saved one"
        )
        raise OSError(
            errno.ENOSPC,
            f"no space left on the device to write {what} {folder}: this rank's part needs about "
            f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; {advice}",
        ) from error


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard on this rank
    return local.numel() * local.element_size()


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
    state = {"model": model_state, "optim": optim_state}
    with _no_space_said(partial, state), warnings.catch_warnings(), _interrupts_pass_through():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(partial))
        torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    if info.is_main:
        (partial / "trainer.json").write_text(json.dumps(_json_tensors(trainer_state), indent=1))
    barrier(info)
    # Every file is written: each rank hashes its share, rank 0 records them all, last.
    names = sorted(p.name for p in partial.iterdir() if p.is_file() and p.name != CHECKSUMS)
    shares = all_gather_objects(
        {name: _file_digest(partial / name) for name in names[info.rank :: info.world_size]}, info
    )
    if info.is_main:
        digests = {name: share[name] for share in shares for name in share}
        (partial / CHECKSUMS).write_text(json.dumps(dict(sorted(digests.items())), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoint_steps(directory)[:-keep] if keep > 0 else []:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    barrier(info)
    return final


def _file_digest(path: Path) -> dict:
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` against its checksums.json, in a few words that
    name the file (None: every recorded file is there, with its size and sha256). A checkpoint
    written before checksums existed is accepted as it is (`has_checksums` tells them apart)."""
    record = path / CHECKSUMS
    if not record.exists():
        return None
    try:
        digests = json.loads(record.read_text())
        expected = {name: (int(d["bytes"]), str(d["sha256"])) for name, d in digests.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        return f"{record} is unreadable ({type(error).__name__}: {error})"
    for name, (size, sha256) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} recorded (truncated or incomplete)"
        if _file_digest(file)["sha256"] != sha256:
            return f"{file} does not match its recorded sha256 (damaged)"
    return None


def has_checksums(path: Path) -> bool:
    return (path / CHECKSUMS).exists()


def load_checkpoint(path: Path, model: nn.Module, optimizer, info: ProcessInfo) -> dict:
    """Restore what save_checkpoint wrote; returns the trainer state. Files it cannot read are
    named in a ValueError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer_file = path / "trainer.json"
    try:
        trainer_state = json.loads(trainer_file.read_text(), object_hook=_tensor_from_json)
    except ValueError as error:
        raise ValueError(f"{trainer_file} is not valid JSON (cut short or damaged?): {error}") from None
    rng_file = _rng_file(path, info, trainer_state)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with warnings.catch_warnings(), _interrupts_pass_through():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as error:
        # The last line of a CheckpointException (a traceback per rank) is the reader's error.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[-1][:300] if lines else type(error).__name__
        raise ValueError(
            f"checkpoint {path}: its weights could not be read ({detail}); without {CHECKSUMS} it "
            "cannot say which file is damaged"
        ) from error
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    try:
        rng_state = torch.load(rng_file, weights_only=False)
    except Exception as error:
        raise ValueError(f"{rng_file} could not be read ({type(error).__name__}: {error})") from error
    _set_rng_state(rng_state)
    return trainer_state


def _rng_file(path: Path, info: ProcessInfo, trainer_state: dict) -> Path:
    """This rank's RNG state file. A checkpoint of another number of processes (trainer.json's
    world_size) gives rank r the state of its rank r mod that number: the data order does not
    depend on it (PairedBatches is a function of seed, epoch and step), only dropout-like draws
    would, and they cannot continue one stream per rank across a change of ranks anyway."""
    saved = trainer_state.get("world_size", info.world_size)
    rank = info.rank if saved == info.world_size else info.rank % saved
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        found = len(list(path.glob("rng_rank*.pt")))
        raise ValueError(
            f"{rng_file} is missing: the checkpoint was written by {saved} process(es) and holds the RNG "
            f"states of {found}"
        )
    return rng_file


def saved_world_size(path: Path) -> int | None:
    """The number of processes that wrote the checkpoint at `path` (None: written before fastnpo
    recorded it; then as many as rng_rank*.pt files)."""
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError):
        return None  # the integrity check names the file
    if "world_size" in state:
        return int(state["world_size"])
    return len(list(path.glob("rng_rank*.pt"))) or None


def grad_accum_for_world_size(grad_accum: int, saved_world: int, world: int) -> int:
    """optim.grad_accum that keeps a checkpoint's global batch (micro-batch x grad_accum x
    processes) when a run of `saved_world` processes resumes on `world`: the same micro-batches
    per step, so the same examples in each (ConfigError naming the settings when no whole number
    does)."""
    micro_batches = grad_accum * saved_world
    if micro_batches % world:
        raise ConfigError(
            f"run.resume: the checkpoint's steps ran optim.grad_accum={grad_accum} micro-batches on each of "
            f"{saved_world} processes, {micro_batches} per step, which {world} processes cannot share evenly: "
            f"the global batch and the data order would change. Resume on a number of processes that divides "
            f"{micro_batches}, or start over (run.resume=false run.overwrite=true)"
        )
    return micro_batches // world


def _processes(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def keep_global_batch(config, info: ProcessInfo, resume_from: Path | None, log):
    """The config to train with: `config`, or, when resuming a checkpoint that another number of
    processes wrote, `config` with the optim.grad_accum that keeps the checkpoint's global batch
    (the run's config.yaml keeps what the user set)."""
    if resume_from is None:
        return config
    saved = saved_world_size(resume_from)
    if saved is None or saved == info.world_size:
        return config
    optim = config.optim
    grad_accum = grad_accum_for_world_size(optim.grad_accum, saved, info.world_size)
    if optim.in_backward and grad_accum != 1:
        raise ConfigError(
            f"run.resume: the checkpoint was written by {_processes(saved)}; keeping its global batch on "
            f"{info.world_size} needs optim.grad_accum={grad_accum}, which optim.in_backward cannot do. Resume on "
            f"{saved * optim.grad_accum} processes, or start over (run.resume=false run.overwrite=true)"
        )
    log(
        f"run.resume: the checkpoint was written by {_processes(saved)}, this run has {info.world_size}: "
        f"optim.grad_accum {optim.grad_accum} -> {grad_accum} keeps its global batch and data order"
    )
    return dataclasses.replace(config, optim=dataclasses.replace(optim, grad_accum=grad_accum))


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
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    batches,
    info: ProcessInfo,
    *,
    keep: int,
    method_state: dict | None = None,
) -> None:
    """Everything a resume needs: weights, optimizer, scheduler, data position, the method's state
    that changes during training (Method.state_dict; RNG: save_checkpoint)."""
    state = {
        "step": step,
        "world_size": info.world_size,
        "scheduler": scheduler.state_dict(),
        "batches": batches.state_dict(),
        "method": method_state or {},
    }
    save_checkpoint(directory, step, model, optimizer, state, info, keep=keep)


def intact_checkpoint(newest: Path, info: ProcessInfo, log) -> Path:
    """`newest`, or the newest older checkpoint beside it, that matches its checksums.json (rank 0
    checks, every rank gets its answer). Each damaged one is logged in a line naming the file;
    a ConfigError in one line when none is intact."""
    chosen, problems = None, []
    if info.is_main:
        newest_step = int(newest.name.split("_")[1])
        candidates = [s for s in checkpoint_steps(newest.parent) if s <= newest_step][::-1]
        for step in candidates:
            path = newest.parent / f"step_{step}"
            problem = checkpoint_problem(path)
            if problem is None:
                chosen = path
                if not has_checksums(path):
                    log(f"checkpoint {path} has no {CHECKSUMS} (written by an older fastnpo): resuming unverified")
                break
            problems.append(problem)
            log(f"checkpoint {path} is damaged: {problem}; falling back to the previous checkpoint")
    chosen, problems = all_gather_objects((chosen, problems), info)[0]
    if chosen is None:
        raise ConfigError(
            f"run.resume: no intact checkpoint in {newest.parent}: "
            + "; ".join(problems)
            + ". Restore the files, or set run.resume=false run.overwrite=true to start over"
        )
    return chosen


def resume_run_state(
    path: Path, model: nn.Module, optimizer, scheduler, batches, info: ProcessInfo, log=print, load_method=None
) -> tuple[Path, int]:
    """Restore what save_run_state wrote, from the newest intact checkpoint at or before `path`
    (intact_checkpoint); returns it and the step to continue from. load_method(saved): restores the
    method's state (Method.load_state_dict; {} from a checkpoint written before it was saved)."""
    path = intact_checkpoint(path, info, log)
    state = load_checkpoint(path, model, optimizer, info)
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["batches"])
    if load_method is not None:
        load_method(state.get("method", {}))
    return path, state["step"]


def hf_state_dict(wrapper: nn.Module) -> dict:
    """full_state_dict of a SequenceLogprobModel keyed like the Hugging Face model it wraps
    (every rank: a collective)."""
    return {k.removeprefix("lm."): v for k, v in full_state_dict(wrapper).items()}


def export_hf(wrapper: nn.Module, model: nn.Module, tokenizer, path: Path, info: ProcessInfo, *, lora: bool) -> None:
    """A Hugging Face folder (safetensors) that from_pretrained loads; LoRA runs save the adapter.
    Every rank gathers the full state dict (a collective); rank 0 writes, records and verifies
    checksums.json (as a checkpoint's), then renames."""
    state = hf_state_dict(wrapper)
    if not info.is_main:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=state)
    with _no_space_said(tmp, state, "the export"):
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    # The export carries its checksums too, read back and verified before final/ appears.
    digests = {f.name: _file_digest(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (tmp / CHECKSUMS).write_text(json.dumps(digests, indent=1))
    problem = checkpoint_problem(tmp)
    if problem is not None:
        raise OSError(f"the export did not read back as written: {problem}; {path} was not created")
    # transformers writes the weights through a private temp file (mode 0600); they should be as
    # readable as the rest of the folder.
    umask = os.umask(0)
    os.umask(umask)
    for file in tmp.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
