"""The output folder's life: decide fresh run, resume, restart or refusal before any work, and
replace an old run (run.overwrite=true) without ever losing it to a new run that fails early.

A run is finished once its end is recorded (run_info.json "finished", or final/). A run that
stopped before its first checkpoint holds nothing worth keeping, so it simply starts over.
run.overwrite=true does not delete the old run up front: when the new run, its inputs all
checked and loaded, starts writing, the old folder is moved aside to `.<name>.replaced`; it is
deleted once the new run has its first checkpoint or its final export, and put back if the new
run fails before that (or, after a kill, by the next start).

One run per output folder (OutputLock): a run takes the folder's lock file before it writes
anything, and holds it until it ends (finished, failed or interrupted); a second run on the same
folder is refused, naming the holder, and writes nothing.
"""

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..distributed import ProcessInfo, all_gather_objects, barrier
from ..files import LockFile, LockHeld, folder_problem
from . import checkpoint
from .config import Config, ConfigError, trajectory_differences


@dataclass
class OutputPlan:
    out: Path
    resume_from: Path | None = None  # the checkpoint to continue from
    replace: bool = False  # run.overwrite=true over an existing folder


def aside_path(out: Path) -> Path:
    out = out.resolve()
    return out.with_name(f".{out.name}.replaced")


def run_finished(out: Path, checkpoints: list[int]) -> bool:
    if (out / "final").exists():
        return True
    if not (out / "run_info.json").exists():
        return False
    try:
        run_info = json.loads((out / "run_info.json").read_text())
    except json.JSONDecodeError:  # cut short mid-write: the run did not finish
        return False
    # run_info.json written before "finished" existed: a run without checkpoints had finished.
    return bool(run_info.get("finished", not checkpoints))


def prepare_output_dir(config: Config, info: ProcessInfo, log: Callable[[str], None]) -> OutputPlan:
    """Decide between a fresh run, a resume and a restart; refuse what would overwrite, mix or
    silently alter runs. Writes nothing, except putting back a run a killed replacement left aside."""
    out = Path(config.run.output_dir)
    _check_writable(out)
    _recover_replaced(out, info, log)
    checkpoints = checkpoint.checkpoint_steps(out / "checkpoints")
    overwrite = config.run.overwrite
    if run_finished(out, checkpoints):
        if not overwrite:
            raise ConfigError(
                f"run.output_dir {out} already holds a run that finished; nothing to do. "
                "Set run.overwrite=true to replace it, or use another run.output_dir"
            )
        _check_aside_writable(out)
        return OutputPlan(out, replace=True)
    if checkpoints and config.run.resume:
        return OutputPlan(out, resume_from=_checked_resume(config, out, checkpoints))
    if checkpoints and not overwrite:
        raise ConfigError(
            f"run.output_dir {out} already holds a run (checkpoints up to step {checkpoints[-1]}); "
            "set run.resume=true to continue it, or run.overwrite=true to replace it"
        )
    if (out / "run_info.json").exists() and not checkpoints:
        log(f"{out} holds a run that stopped before its first checkpoint; starting it over")
    replace = overwrite and out.exists()
    if replace:
        _check_aside_writable(out)
    return OutputPlan(out, replace=replace)


def _check_writable(out: Path) -> None:
    problem = folder_problem(out)
    if problem is not None:  # before any work; a file is the user's: run.overwrite=true does not touch it
        raise ConfigError(f"run.output_dir {out} {problem}; set run.output_dir to a folder this run can write")


def _check_aside_writable(out: Path) -> None:
    """run.overwrite=true moves the old run aside beside it: its parent must be writable."""
    parent = out.resolve().parent
    problem = folder_problem(parent)
    if problem is not None:
        raise ConfigError(
            f"run.output_dir {out}: run.overwrite=true moves the old run aside to {aside_path(out)}, "
            f"but {parent} {problem}; use another run.output_dir"
        )


def _checked_resume(config: Config, out: Path, checkpoints: list[int]) -> Path:
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    current = OmegaConf.to_container(OmegaConf.structured(config))
    differences = trajectory_differences(saved, current)
    if differences:
        raise ConfigError(
            f"{out} holds checkpoints of a run with another config; resume refused. Differences: "
            + "; ".join(differences)
            + ". Use another run.output_dir, or run.resume=false run.overwrite=true."
        )
    return out / "checkpoints" / f"step_{checkpoints[-1]}"


def _recover_replaced(out: Path, info: ProcessInfo, log) -> None:
    """A replacement killed before its first checkpoint or export left the old run aside: put it back."""
    aside = aside_path(out)
    if info.is_main and aside.exists():
        done = checkpoint.checkpoint_steps(out / "checkpoints") or (out / "final").exists()
        if done:  # killed between the new run's first checkpoint and the old one's deletion
            shutil.rmtree(aside)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(aside, out)
            log(f"put back the run a killed replacement had moved aside to {aside}")
    barrier(info)


class OutputFolder:
    """The plan carried out while the run writes: begin() when it starts writing, commit() at
    its first checkpoint or export, abandon() if it fails before."""

    def __init__(self, plan: OutputPlan, info: ProcessInfo):
        self.plan, self.info = plan, info
        self.aside = aside_path(plan.out) if plan.replace else None

    def begin(self) -> None:
        if self.aside is not None and self.info.is_main:
            shutil.rmtree(self.aside, ignore_errors=True)
            os.replace(self.plan.out, self.aside)
        barrier(self.info)

    def commit(self) -> None:
        if self.aside is not None and self.info.is_main:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.aside = None

    def abandon(self) -> None:
        """Put the old run back (rank 0); the failed new run's files go."""
        if self.aside is not None and self.info.is_main and self.aside.exists():
            shutil.rmtree(self.plan.out, ignore_errors=True)
            os.replace(self.aside, self.plan.out)
        self.aside = None


def lock_path(out: Path) -> Path:
    """The output folder's lock: `<name>.lock` beside it (the folder itself is moved aside by
    run.overwrite=true, its lock must stay); inside it, as `.fastnpo.lock`, when the folder
    exists and its parent is not writable (run.overwrite=true is refused there anyway)."""
    out = Path(out).resolve()  # one lock, however the folder is spelled (symlinks, ..)
    if out.is_dir() and folder_problem(out.parent) is not None:
        return out / ".fastnpo.lock"
    return out.parent / f"{out.name}.lock"


class OutputLock:
    """One run per output folder, taken before the run writes anything and released when it
    ends, also on an error or Ctrl-C (a context manager; rank 0 holds it under torchrun, the
    other ranks share its outcome).

    The lock is a file (lock_path) created atomically (O_CREAT|O_EXCL) and holding the holder's
    host, pid, start time and command. A second run on the folder is refused with a ConfigError
    naming the holder, and writes nothing. A lock whose holder ran on this host and is gone (a
    killed run) is stale: it is removed, with a log line, and the run goes on. A lock taken on
    another host cannot be checked from here and is always refused: the message says which file
    to delete once the user knows that run has ended. Shared filesystems: exclusive creation is
    atomic on local disks and NFSv3 or later (and Lustre, GPFS, CephFS); on NFSv2 and on
    object-store mounts (s3fs, gcsfuse) two runs started at the same instant may both get it.
    Hosts are told apart by hostname: containers sharing one hostname but not one pid
    namespace could take a live run for a dead one."""

    def __init__(self, out: str | Path, info: ProcessInfo, log: Callable[[str], None]):
        self.out, self.info, self.log = Path(out), info, log
        self.lock: LockFile | None = None

    def __enter__(self) -> "OutputLock":
        _check_writable(self.out)  # the same answer on every rank; the lock's folder may be created
        error: BaseException | None = None
        if self.info.is_main:
            try:
                self._acquire()
            except Exception as caught:  # every rank must learn of it, or the others wait forever
                error = caught
        if self.info.distributed:
            message = all_gather_objects(None if error is None else str(error), self.info)[0]
            if message is not None and error is None:
                raise ConfigError(message)
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _acquire(self) -> None:
        path = lock_path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = LockFile(path)

        def stale(holder: dict) -> None:
            who = f"pid {holder['pid']} on {holder.get('host')}" if "pid" in holder else "an unreadable holder"
            self.log(f"removed the stale lock {path} of a run that no longer runs ({who})")

        try:
            lock.acquire(on_stale=stale)
        except LockHeld as held:
            raise ConfigError(_held_message(self.out, held)) from None
        self.lock = lock


def _held_message(out: Path, held: LockHeld) -> str:
    holder = held.holder
    if "pid" not in holder:
        who = "another run (its lock file is being written or unreadable)"
    else:
        who = f"another run: pid {holder['pid']} on host {holder.get('host')}"
        if holder.get("started"):
            who += f", started {holder['started']}"
        if holder.get("command"):
            who += f" ({holder['command']})"
    if holder.get("host") not in (None, socket.gethostname()):
        hint = f"if that run has ended, delete {held.path}"
    else:
        hint = f"wait for it to end, or use another run.output_dir (the lock is {held.path})"
    return " ".join(f"run.output_dir {out} is in use by {who}; {hint}".split("\n"))
