"""Resume on another number of processes (issue 28 item 2): a run checkpointed on 4 ranks goes on on
2 and on 1, and one checkpointed on 1 goes on on 4, through the same global batches (optim.grad_accum
is adjusted to keep micro-batch x grad_accum x processes), to the parameters of an uninterrupted run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import interrupted_in_step
from safetensors.torch import load_file

from fastnpo.distributed import ProcessInfo
from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu.minitofu import prepare_tiny
from fastnpo.train import train
from fastnpo.train.checkpoint import grad_accum_for_world_size, keep_global_batch
from fastnpo.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def info(world_size: int) -> ProcessInfo:
    return ProcessInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))


def test_grad_accum_keeps_the_micro_batches_per_step():
    assert grad_accum_for_world_size(1, 4, 2) == 2
    assert grad_accum_for_world_size(1, 4, 1) == 4
    assert grad_accum_for_world_size(4, 1, 4) == 1
    assert grad_accum_for_world_size(2, 2, 4) == 1
    with pytest.raises(
        ConfigError,
        match=r"optim\.grad_accum=1 micro-batches on each of 2 processes, 2 per step, "
        r"which 3 processes cannot share evenly",
    ):
        grad_accum_for_world_size(1, 2, 3)


def checkpoint_of(tmp_path, world_size: int) -> Path:
    path = tmp_path / "checkpoints" / "step_2"
    path.mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"step": 2, "world_size": world_size}))
    return path


def test_the_config_changes_only_on_another_world_size_and_in_backward_is_refused(tmp_path):
    config = load_config(CONFIG, ["optim.grad_accum=2"])
    said = []
    assert keep_global_batch(config, info(2), checkpoint_of(tmp_path / "a", 2), said.append) is config
    assert keep_global_batch(config, info(2), None, said.append) is config
    assert not said
    changed = keep_global_batch(config, info(1), checkpoint_of(tmp_path / "b", 2), said.append)
    assert changed.optim.grad_accum == 4 and config.optim.grad_accum == 2
    assert said == [
        "run.resume: the checkpoint was written by 2 processes, this run has 1: optim.grad_accum 2 -> 4 "
        "keeps its global batch and data order"
    ]
    in_backward = load_config(CONFIG, ["optim.in_backward=true", "optim.max_grad_norm=0"])
    with pytest.raises(
        ConfigError,
        match=r"needs optim\.grad_accum=2, which optim\.in_backward cannot do\. "
        r"Resume on 4 processes",
    ):
        keep_global_batch(in_backward, info(2), checkpoint_of(tmp_path / "c", 4), said.append)


def overrides(tiny, out, root, **extra):
    values = {
        "model.name_or_path": tiny["base"],
        "data.forget": tiny["data"],
        "data.retain": tiny["data"],
        "data.batch_size": 2,
        "data.retain_batch_size": 2,
        "data.max_length": 64,
        "method.name": "npo_rt",
        "run.output_dir": out,
        "run.cache_dir": root / "cache",
        "run.progress": False,
        "run.checkpoint_every": 2,
        "optim.lr": 1e-3,
        "optim.max_steps": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(root: Path, name: str, processes: int, runs: list[dict]) -> subprocess.CompletedProcess:
    (root / f"{name}.json").write_text(json.dumps(runs))
    driver = Path(__file__).parent / "two_rank_runs.py"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            str(driver),
            str(root / f"{name}.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """straight: 1 process x grad_accum 4, uninterrupted. r4: 4 ranks, stopped in step 3 (after its
    step-2 checkpoint), then copied and resumed on 2 ranks (r4to2) and on 1 (r4to1). r1: 1 process,
    stopped in step 3, resumed on 4 ranks (r1to4). Every global batch: 8 forget + 8 retain examples."""
    root = tmp_path_factory.mktemp("resume_world_size")
    tiny = prepare_tiny(
        root / "tiny", num_authors=20, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64)
    )
    one = {"optim.grad_accum": 4}
    train(load_config(CONFIG, overrides(tiny, root / "straight", root, **one)))
    with interrupted_in_step(3), pytest.raises(KeyboardInterrupt):
        train(load_config(CONFIG, overrides(tiny, root / "r1", root, **one)))
    shutil.copytree(root / "r1", root / "r1to4")
    four = torchrun(
        root,
        "four",
        4,
        [
            {"config": str(CONFIG), "overrides": overrides(tiny, root / "r4", root), "stop_in_step": 3},
            {"config": str(CONFIG), "overrides": overrides(tiny, root / "r1to4", root, **one)},
        ],
    )
    assert four.returncode == 0, four.stdout[-3000:] + four.stderr[-3000:]
    shutil.copytree(root / "r4", root / "r4to2")
    shutil.copytree(root / "r4", root / "r4to1")
    two = torchrun(root, "two", 2, [{"config": str(CONFIG), "overrides": overrides(tiny, root / "r4to2", root)}])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    train(load_config(CONFIG, overrides(tiny, root / "r4to1", root)))
    return root, tiny, {"four": four.stdout + four.stderr, "two": two.stdout + two.stderr}


@pytest.mark.parametrize("run", ["r4to2", "r4to1", "r1to4"])
def test_a_run_resumed_on_another_world_size_matches_the_uninterrupted_one(resumed, run):
    root, tiny, logs = resumed
    records = {
        name: [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("straight", run)
    }
    assert [r["step"] for r in records[run]] == [1, 2, 3, 4]  # resumed after step 2, not started over
    for a, b in zip(records["straight"], records[run], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (run, a["step"])
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    straight = load_file(root / "straight" / "final" / "model.safetensors")
    resumed_weights = load_file(root / run / "final" / "model.safetensors")
    for key in straight:
        moved = (straight[key] - initial[key]).abs().max().item()
        assert moved > 1e-4, key
        # reduction order differs between world sizes; see test_train.py's two-process test
        torch.testing.assert_close(resumed_weights[key], straight[key], atol=0.01 * moved, rtol=0, msg=key)
    said = {
        "r4to2": ("two", "4 processes, this run has 2: optim.grad_accum 1 -> 2"),
        "r1to4": ("four", "1 process, this run has 4: optim.grad_accum 4 -> 1"),
    }
    if run in said:
        job, line = said[run]
        assert line in logs[job], logs[job][-3000:]
