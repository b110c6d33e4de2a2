"""The trainer's errors before work (issue 22 item 4): an output folder that is a file or cannot
be written is refused before the reference pass (nothing written, no ref-cache/), Ctrl-C ends
`fastnpo train` with one line and exit 130, an unreachable model name is refused in under 2 s,
and a forget set with repeated questions says how many."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from helpers import REPO, tiny_config, tiny_overrides

from fastnpo import cli, files
from fastnpo.config import ConfigError
from fastnpo.train import train


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- the output folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_dir_that_is_a_file_is_refused_before_the_reference_pass(tiny, tmp_path, overwrite):
    # Today: FileExistsError after the reference pass, a new ref-cache/ beside it, and with
    # run.overwrite=true the user's file moved to .outfile.txt.replaced.
    work = tmp_path / "work"
    work.mkdir()
    (work / "outfile.txt").write_text("my notes")
    extra = {"method.name": "npo", "run.overwrite": str(overwrite).lower()}
    with pytest.raises(ConfigError, match=r"run\.output_dir .*outfile\.txt is a file"):
        train(tiny_config(tiny, work / "outfile.txt", **extra))
    assert tree(work) == ["outfile.txt"] and (work / "outfile.txt").read_text() == "my notes"


def test_an_output_dir_under_a_file_is_refused_before_any_work(tiny, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "outfile.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"run\.output_dir .*outfile\.txt is a file"):
        train(tiny_config(tiny, work / "outfile.txt" / "run", **{"method.name": "npo"}))
    assert tree(work) == ["outfile.txt"]


def _read_only(folder: Path, monkeypatch) -> None:
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: make os.access say what it would say
        real = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: False if Path(path) == folder and mode & os.W_OK else real(path, mode),
        )


@pytest.mark.parametrize("where", ["parent", "folder", "replace"])
def test_a_read_only_output_folder_or_parent_is_refused_before_any_work(tiny, tmp_path, monkeypatch, where):
    # Today: PermissionError traceback after the reference pass.
    work = tmp_path / "work"
    out = work / "run"
    work.mkdir()
    extra = {"method.name": "npo"}
    if where != "parent":
        out.mkdir()
    if where == "replace":  # run.overwrite=true moves the old run aside: beside it, in work/
        (out / "final").mkdir()
        extra["run.overwrite"] = "true"
    locked = out if where == "folder" else work
    before = tree(work)
    _read_only(locked, monkeypatch)
    try:
        with pytest.raises(ConfigError, match=rf"run\.output_dir .*{locked} is not writable"):
            train(tiny_config(tiny, out, **extra))
        assert tree(work) == before
    finally:
        locked.chmod(0o755)


def test_cli_says_one_line_for_an_output_file(tiny, tmp_path, capsys):
    (tmp_path / "outfile.txt").write_text("my notes")
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    argv = args + tiny_overrides(tiny, tmp_path / "outfile.txt", **{"method.name": "npo", "run.overwrite": "true"})
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "fastnpo train: error: run.output_dir" in err and "is a file" in err
    assert tree(tmp_path) == ["outfile.txt"]


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.torchrun
def test_ctrl_c_says_one_line_with_the_step_and_the_resume_command_and_exits_130(tiny, tmp_path):
    # Today: a 42-line KeyboardInterrupt traceback.
    out = tmp_path / "run"
    extra = {
        "method.name": "npo",
        "optim.max_steps": 100000,
        "run.checkpoint_every": 1,
        "run.cache_dir": tmp_path / "c",
    }
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *tiny_overrides(tiny, out, **extra)]
    process = subprocess.Popen(
        # -X faulthandler: a run that does not end after Ctrl-C is sent SIGABRT and prints where
        # every thread stands (one such hang was seen once in a loaded full-suite run, not reproduced).
        [sys.executable, "-X", "faulthandler", "-m", "fastnpo.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell may start background jobs with SIGINT ignored; Ctrl-C is what this test sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step_2" / "trainer.json").exists() and process.poll() is None:
            assert time.time() < deadline, "no checkpoint in 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        try:
            stderr = process.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            raise AssertionError("still running 120 s after Ctrl-C:\n" + process.communicate(timeout=60)[1]) from None
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fastnpo train:")]
    assert len(lines) == 1, stderr
    line = lines[0]
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    newest = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    reached = int(line.split("interrupted at step ")[1].split(" of 100000")[0])
    assert reached >= 2 and reached in (steps[-1], steps[-1] + 1), line  # +1: done, not yet logged
    assert f"last checkpoint {out / 'checkpoints' / f'step_{newest}'}" in line, line
    assert "fastnpo train --config" in line and "run.output_dir=" in line, line


def test_ctrl_c_before_a_checkpoint_and_before_the_steps(tiny, tmp_path, monkeypatch, capsys, python_sigint):
    from fastnpo.train import trainer
    from fastnpo.train.trainer import Trainer

    calls = {"n": 0}
    real_step = Trainer.step

    def interrupted_on_the_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Trainer, "step", interrupted_on_the_second)
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    argv = args + tiny_overrides(tiny, tmp_path / "run", **{"method.name": "npo", "run.resume": "false"})
    assert cli.main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastnpo")]
    assert len(err) == 1 and err[0].startswith("fastnpo train: interrupted at step 1 of 2 (no checkpoint yet"), err
    assert err[0].endswith(f"to start over, run: fastnpo {' '.join(argv)}"), err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run

    def interrupted_in_setup(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_model", interrupted_in_setup)
    assert cli.main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastnpo")]
    assert len(err) == 1 and err[0].startswith("fastnpo train: interrupted before the first step"), err


# ----------------------------------------------------------------------------- unreachable models


@pytest.fixture
def offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_cache_ref_offline_names_the_key_in_under_2_s(offline, capsys):
    # Today: 50 s of "Retrying in 8s [Retry n/5]" before the clear line.
    started = time.perf_counter()
    assert cli.main(["cache-ref", "--config", str(REPO / "configs" / "tofu_llama2_7b_npo_1gpu.yaml")]) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err
    assert "fastnpo cache-ref: error: model.name_or_path 'locuslab/tofu_ft_llama2-7b' is neither a local folder" in err


def test_train_with_an_unreachable_model_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "hub_reachable", lambda: False)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"model\.tokenizer 'org/tokenizer' is neither a local folder"):
        train(tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "model.tokenizer": "org/tokenizer"}))
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- duplicates


def test_a_forget_set_with_repeated_questions_says_how_many(tiny, tmp_path):
    rows = [{"question": "Who wrote the book?", "answer": f"Ann {i}."} for i in range(6)]
    rows.append({"question": "Where was she born?", "answer": "Oslo."})
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"forget set .*forget\.jsonl.*: 5 of 7 examples repeat a question") as caught:
        extra = {"method.name": "npo", "data.forget": forget, "optim.max_steps": 1}
        train(tiny_config(tiny, tmp_path / "run", **extra))
    assert len([w for w in caught if "repeat a question" in str(w.message)]) == 1
    from fastnpo.data import build_unlearning_data
    from fastnpo.modeling import load_tokenizer

    config = tiny_config(tiny, tmp_path / "other", **{"method.name": "npo"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_unlearning_data(config.data, load_tokenizer(str(tiny["base"])))
    assert not [w for w in seen if "repeat a question" in str(w.message)]  # Mini-TOFU has none


def test_an_interrupt_inside_a_checkpoint_write_stays_an_interrupt():
    """Ctrl-C inside torch.save's zip writer comes out of DCP as the writer's RuntimeError, raised
    during the KeyboardInterrupt, wrapped in a CheckpointException: still an interrupt. A real
    write error stays what it is."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from fastnpo.train.checkpoint import _interrupts_pass_through

    def failed_write(interrupted: bool) -> CheckpointException:
        try:
            try:
                if interrupted:
                    raise KeyboardInterrupt
            finally:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 642 vs 598")
        except RuntimeError as error:
            return CheckpointException("write", {0: (error, traceback.extract_tb(error.__traceback__))})

    with pytest.raises(KeyboardInterrupt), _interrupts_pass_through():
        raise failed_write(interrupted=True)
    with pytest.raises(CheckpointException), _interrupts_pass_through():
        raise failed_write(interrupted=False)


def test_an_optimizer_the_dtype_cannot_take_is_refused_before_the_reference_pass(tiny, tmp_path, capsys):
    """Issue 26 item 6: adamw_kahan with float32 parameters was refused only after the reference pass
    had run and written its cache. Now: one line, exit 2, nothing written."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    extra = {"method.name": "npo", "optim.name": "adamw_kahan", "model.dtype": "float32", "run.cache_dir": cache}
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *tiny_overrides(tiny, out, **extra)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "adamw_kahan keeps bf16 parameters and needs model.dtype=bfloat16" in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_cache_ref_exits_non_zero_when_it_cannot_store_the_cache(tiny, tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: `fastnpo cache-ref` said {"hit": false} and exited 0 with no file written
    (disk full). The trainer still goes on with the computed values; the command fails in one line."""
    import errno

    from fastnpo.refcache import build

    def disk_full(path, ref):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(build, "save_ref_logprobs", disk_full)
    cache = tmp_path / "cache"
    extra = {"method.name": "npo", "run.cache_dir": cache}
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    argv = ["cache-ref", "--config", config, *tiny_overrides(tiny, tmp_path / "run", **extra)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("fastnpo cache-ref: error:")]
    assert len(errors) == 1 and "could not be stored" in errors[0] and str(cache) in errors[0], captured.err
    assert "No space left on device" in captured.out + captured.err  # the reason, from the line before


def test_a_full_disk_at_a_checkpoint_says_no_space_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: a full disk during a 1-process checkpoint said only `CheckpointException ...
    unexpected pos 704 vs 598`. Now: one line naming the folder, the bytes needed and free, exit 2."""
    import shutil as real_shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from fastnpo.train import checkpoint

    def full_disk_save(state, checkpoint_id):
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise CheckpointException("save", {0: (error, None)})

    usage = real_shutil.disk_usage

    def nearly_full(path):
        return usage(path)._replace(free=4096)

    monkeypatch.setattr(dcp, "save", full_disk_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    out = tmp_path / "run"
    extra = {"method.name": "npo", "run.checkpoint_every": 1, "run.cache_dir": tmp_path / "cache"}
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *tiny_overrides(tiny, out, **extra)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastnpo train: error")]
    assert len(errors) == 1 and "no space left on the device" in errors[0], err
    assert str(out / "checkpoints" / ".partial_step_1") in errors[0] and "0 MiB are free" in errors[0], err
    assert "Traceback" not in err


def test_a_checkpoint_failure_that_is_not_the_disk_stays_what_it_is(tmp_path):
    import errno

    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from fastnpo.train.checkpoint import _no_space_said

    with pytest.raises(CheckpointException), _no_space_said(tmp_path, {"w": torch.zeros(4)}):
        raise CheckpointException("save", {0: (RuntimeError("a bug"), None)})
    with pytest.raises(OSError, match="no space left"), _no_space_said(tmp_path, {}):
        raise CheckpointException("save", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})


def test_a_full_disk_at_the_export_says_no_space_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    """Issue 26 item 4: a full disk at the export gave a raw traceback with exit 1. Now: one line
    naming the folder and the bytes needed, exit 2, and no final/."""
    import errno
    import shutil as real_shutil

    from transformers import PreTrainedModel

    from fastnpo.train import checkpoint

    def full_disk(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    usage = real_shutil.disk_usage
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(path)._replace(free=2**20))
    out = tmp_path / "run"
    extra = {"method.name": "npo", "run.cache_dir": tmp_path / "cache"}
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *tiny_overrides(tiny, out, **extra)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastnpo train: error")]
    assert len(errors) == 1 and "no space left on the device to write the export" in errors[0], err
    assert str(out / "final.partial") in errors[0] and "1 MiB are free" in errors[0], err
    assert "Traceback" not in err and not (out / "final").exists()
