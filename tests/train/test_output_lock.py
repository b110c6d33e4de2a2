"""One run per output folder (issue 26 item 2): a run takes `<output_dir>.lock` before it writes
anything; a second run on the folder is refused in one line naming the holder and writes nothing;
a lock left by a dead process is recovered; the lock goes when the run ends, however it ends."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_config, tiny_overrides

from fastnpo import files
from fastnpo.config import ConfigError
from fastnpo.train import train
from fastnpo.train.output import lock_path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    path = lock_path(out)
    record = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00", "command": "x"}
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def extra(tmp_path, **more):
    return {"method.name": "npo", "run.cache_dir": tmp_path / "cache", **more}


@pytest.mark.torchrun
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder_and_writes_nothing(tiny, tmp_path, sleeper):
    # Today: the second run trains and replaces the first's metrics.jsonl, config.yaml, final/.
    work = tmp_path / "work"
    out = work / "run"
    train(tiny_config(tiny, out, **extra(tmp_path)))
    assert not lock_path(out).exists()
    lock = write_lock(out, sleeper.pid)  # a live run holds the folder
    before = snapshot(work)
    for more in ({"run.overwrite": "true", "optim.lr": 5e-3}, {"run.resume": "true"}):
        with pytest.raises(ConfigError) as refused:
            train(tiny_config(tiny, out, **extra(tmp_path, **more)))
        message = str(refused.value)
        assert "\n" not in message
        holder = f"pid {sleeper.pid} on host {socket.gethostname()}"
        assert f"run.output_dir {out} is in use by another run: {holder}" in message
        assert str(lock) in message
        assert snapshot(work) == before  # nothing written, the holder's lock kept


def test_a_lock_from_another_host_is_refused_saying_which_file_to_delete(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = write_lock(out, 12345, host="some-other-node")
    with pytest.raises(ConfigError, match=rf"pid 12345 on host some-other-node.*if that run has ended, delete {lock}"):
        train(tiny_config(tiny, out, **extra(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.lock"] and not any(out.iterdir())


@pytest.mark.torchrun
def test_a_stale_lock_of_a_dead_process_is_recovered(tiny, tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    out = tmp_path / "run"
    lock = write_lock(out, dead)
    result = train(tiny_config(tiny, out, **extra(tmp_path)))
    assert result["steps"] == 2 and (out / "final").is_dir()
    captured = capsys.readouterr()
    assert f"removed the stale lock {lock} of a run that no longer runs (pid {dead} on" in captured.out + captured.err
    assert not lock.exists()


def test_the_lock_goes_after_a_run_a_failure_and_an_interrupt(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny_config(tiny, out, **extra(tmp_path)))
    assert not lock_path(out).exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    with pytest.raises((ValueError, KeyError, OSError)):  # ConfigError is a ValueError
        train(tiny_config(tiny, tmp_path / "bad_run", **extra(tmp_path, **{"data.forget": bad})))
    assert not lock_path(tmp_path / "bad_run").exists()

    from fastnpo.train.trainer import Trainer

    held = []

    def interrupted(*args, **kwargs):
        held.append(lock_path(tmp_path / "stopped").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny, tmp_path / "stopped", **extra(tmp_path)))
    assert held == [True]  # held while the run wrote, gone after
    assert not lock_path(tmp_path / "stopped").exists()


@pytest.mark.torchrun
def test_two_cli_runs_started_together_one_trains_the_other_is_refused(tiny, tmp_path):
    # Each run is long (it would take minutes), so that however late one of them starts (imports
    # take seconds under load) the other still holds the lock: a short run could end and release
    # it first, and the second would then meet a finished run instead of a running one.
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    long = {"optim.max_steps": 100000, "run.checkpoint_every": 0}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastnpo.cli",
                *args,
                *tiny_overrides(tiny, out, **extra(tmp_path, **long, **{"optim.lr": lr})),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C is how the test ends the winner: Python's handler even if the suite's SIGINT is ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        for lr in (1e-3, 2e-3)
    ]
    try:
        deadline = time.time() + 300
        while all(p.poll() is None for p in processes):
            assert time.time() < deadline, "neither run was refused"
            time.sleep(0.05)
        (loser,) = [p for p in processes if p.poll() is not None]
        (winner,) = [p for p in processes if p is not loser]
        loser_err = loser.communicate(timeout=60)[1]
        assert winner.poll() is None, "the winner holds the lock while the loser is refused"
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert time.time() < deadline and winner.poll() is None, "the winner trains"
            time.sleep(0.05)
        winner.send_signal(signal.SIGINT)
        winner_err = winner.communicate(timeout=120)[1]
    finally:
        for p in processes:
            p.kill()
    assert loser.returncode == 2 and winner.returncode == 130, (loser_err, winner_err)
    errors = [line for line in loser_err.splitlines() if line.startswith("fastnpo train: error:")]
    assert len(errors) == 1 and f"is in use by another run: pid {winner.pid} on host" in errors[0], loser_err
    assert "Traceback" not in loser_err
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "one run's steps, once each"
    assert not lock_path(out).exists()


# ----------------------------------------------------------------------------- the lock file itself


def test_a_reused_pid_or_a_lock_cut_short_long_ago_is_stale(tmp_path):
    path = tmp_path / "x.lock"
    mine = files.LockFile(path)
    mine.acquire()
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(files.LockHeld):
        files.LockFile(path).acquire()
    # the same pid, another start time: a later process that got the dead holder's pid
    path.write_text(json.dumps({**holder, "pid_start": "1"}))
    seen = []
    other = files.LockFile(path)
    other.acquire(on_stale=seen.append)
    assert seen and seen[0]["pid_start"] == "1"
    mine.release()  # no longer mine: kept
    assert path.exists()
    other.release()
    assert not path.exists()
    # a holder killed between creating the file and writing it
    path.write_text("")
    with pytest.raises(files.LockHeld):
        files.LockFile(path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    files.LockFile(path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.torchrun
def test_under_torchrun_both_ranks_are_refused_without_hanging(tiny, tmp_path, sleeper):
    from test_train import run_cli

    out = tmp_path / "run"
    write_lock(out, sleeper.pid)
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *tiny_overrides(tiny, out, **extra(tmp_path))]
    process = run_cli(args, torchrun=True)
    try:
        output = process.communicate(timeout=240)[0]  # a rank left waiting for rank 0 would hang here
    finally:
        process.kill()
    assert process.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("fastnpo train: error:")]
    # Both ranks refuse; the config error is said once, by rank 0.
    assert len(errors) == 1 and f"in use by another run: pid {sleeper.pid}" in errors[0], output
    assert not out.exists()
