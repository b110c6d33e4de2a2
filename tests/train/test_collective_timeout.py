"""distributed.timeout_s: a frozen rank ends the others' run after the timeout, with one line
naming it, instead of half an hour of silence (issue 26 item 5)."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fastnpo import distributed
from fastnpo.distributed import CollectiveTimeout, ProcessInfo
from fastnpo.train.config import Config, ConfigError, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, tiny_overrides
from test_train import run_cli

TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_default_timeout_is_stated_and_used():
    assert Config().distributed.timeout_s == distributed.DEFAULT_TIMEOUT_S == 1800.0
    assert load_config(TINY, ["distributed.timeout_s=7.5"]).distributed.timeout_s == 7.5


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_bad_timeout_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"distributed\.timeout_s"):
        load_config(TINY, [f"distributed.timeout_s={value}"])


def _info(rank: int, world_size: int) -> ProcessInfo:
    import torch

    return ProcessInfo(rank, world_size, rank, torch.device("cpu"))


def test_timeout_message_names_the_other_rank_of_two():
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    with pytest.raises(CollectiveTimeout, match=r"^rank 1 did not answer within distributed\.timeout_s=5 s") as caught:
        distributed.raise_if_timeout(gloo, _info(0, 2), 5.0)
    assert isinstance(caught.value, OSError) and caught.value.__cause__ is gloo  # the CLI's one-line errors
    with pytest.raises(CollectiveTimeout, match=r"^rank 0 did not answer"):
        distributed.raise_if_timeout(gloo, _info(1, 2), 5.0)
    with pytest.raises(CollectiveTimeout, match=r"^another rank \(of 4; gloo does not say which\)"):
        distributed.raise_if_timeout(gloo, _info(2, 4), 5.0)
    # Anything else, or a single process, passes through untouched.
    distributed.raise_if_timeout(RuntimeError("shape mismatch"), _info(0, 2), 5.0)
    distributed.raise_if_timeout(gloo, _info(0, 1), 5.0)


def _children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun `pid` started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def _exited(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.torchrun
def test_frozen_rank_ends_the_other_with_one_line(tiny, tmp_path):
    timeout_s = 10
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    extra = {"optim.max_steps": 100000, "distributed.timeout_s": timeout_s, "run.cache_dir": tmp_path / "cache"}
    proc = run_cli(args + tiny_overrides(tiny, out, **extra), torchrun=True)
    frozen = None
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        # Rank 0 writes a step's record once every rank has taken part in it.
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no step finished"
            time.sleep(0.2)
        ranks = _children(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        frozen = ranks[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        while not _exited(ranks[0]):
            assert time.monotonic() - stopped < timeout_s + 50, "rank 0 still waits for the frozen rank"
            time.sleep(0.2)
        waited = time.monotonic() - stopped
        # Killed while frozen (a preempted machine): woken instead, it would time out in turn.
        os.kill(frozen, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if frozen is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(frozen, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()
    assert proc.returncode != 0, output
    assert waited < timeout_s + 50, output
    lines = [line for line in output.splitlines() if "did not answer" in line]
    assert len(lines) == 1, output  # the survivor's one line
    assert lines[0].startswith("fastnpo train: error"), output
    assert f"rank 1 did not answer within distributed.timeout_s={timeout_s} s" in lines[0], output
    # The survivor's own end: that line, no traceback and no raw gloo message.
    assert "Timed out waiting" not in output and "CollectiveTimeout" not in output, output
    assert "exitcode  : 2" in output, output  # torchrun's summary: rank 0 ended with status 2
