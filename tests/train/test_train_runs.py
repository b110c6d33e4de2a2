"""The output folder over a run's life: a finished run is refused, a crashed one restarts or
resumes with a clean metrics.jsonl, and run.overwrite=true never loses the old run to a bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from test_train import final_weights, write_jsonl

from fastnpo.train import train
from fastnpo.train.config import ConfigError
from fastnpo.train.trainer import Trainer

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them


def metrics_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def snapshot(root) -> dict:
    """Every file under root: its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def crash_at(monkeypatch, failing_step: int):
    """Make the loop's step `failing_step` (1-based) raise, as a crash mid-run would."""
    real, calls = Trainer.step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_step:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("export", [True, False])
def test_finished_run_with_checkpoints_is_refused_and_untouched(tiny, tmp_path, export):
    # Issue 13 item 6: a finished run that kept its checkpoints was resumed: the last step
    # retrained, final/ re-exported, a duplicate metrics line, run_info.json rewritten.
    out = tmp_path / "run"
    extra = {"method.name": "npo", "optim.max_steps": 3, "run.checkpoint_every": 1, "run.export": export}
    train(tiny_config(tiny, out, **extra))
    before = snapshot(out)
    with pytest.raises(ConfigError, match="already holds a run that finished"):
        train(tiny_config(tiny, out, **extra))
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- item 7


def test_resume_drops_the_killed_runs_metrics_past_the_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    extra = {"method.name": "npo_rt", "optim.max_steps": 6, "run.checkpoint_every": 2}
    crash_at(monkeypatch, 4)  # steps 1-3 logged, the newest checkpoint is step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny, out, **extra))
    assert metrics_steps(out) == [1, 2, 3]
    monkeypatch.undo()
    train(tiny_config(tiny, out, **extra))
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]


def test_offloaded_run_resumes_to_the_same_parameters(tiny, tmp_path, monkeypatch):
    # The optimizer state of an offloaded run is CPU DTensors: the checkpoint must carry it.
    import fastnpo.train.setup as setup

    extra = {"method.name": "npo_rt", "optim.max_steps": 4, "run.checkpoint_every": 2, "optim.offload": "true"}
    allow = ("cuda", "cpu")  # optim.offload is refused on CPU outside tests (test_train.py's offload_on_cpu)
    monkeypatch.setattr(setup, "OFFLOAD_DEVICES", allow)
    train(tiny_config(tiny, tmp_path / "straight", **extra))
    out = tmp_path / "run"
    crash_at(monkeypatch, 4)  # the newest checkpoint is step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny, out, **extra))
    monkeypatch.undo()
    monkeypatch.setattr(setup, "OFFLOAD_DEVICES", allow)
    train(tiny_config(tiny, out, **extra))
    assert metrics_steps(out) == [1, 2, 3, 4]
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_run_that_crashed_before_its_first_checkpoint_restarts(tiny, tmp_path, monkeypatch, capsys):
    extra = {"method.name": "npo_rt", "optim.max_steps": 4, "run.checkpoint_every": 3}
    train(tiny_config(tiny, tmp_path / "straight", **extra))
    out = tmp_path / "run"
    crash_at(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny, out, **extra))
    monkeypatch.undo()
    capsys.readouterr()
    train(tiny_config(tiny, out, **extra))
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    assert metrics_steps(out) == [1, 2, 3, 4]
    straight, restarted = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(straight[k], restarted[k]) for k in straight)


def test_truncation_error_names_the_set_the_file_and_the_example(tiny, tmp_path):
    rows = [{"question": "Who?", "answer": "Ann."}] * 5 + [{"question": "Who wrote it? " * 40, "answer": "Ann."}]
    forget = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(ValueError, match=r"forget set .*f\.jsonl.*example 5\b"):
        train(tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "data.forget": forget}))


# ----------------------------------------------------------------------------- item 4


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tiny, out, **{"method.name": "npo", "optim.max_steps": 2}))
    return out


def bad_input(case: str, tmp_path) -> dict:
    """Overrides that make a new run fail on its inputs (issue 13 item 4's list)."""
    if case == "missing_file":
        return {"data.forget": tmp_path / "nope.jsonl"}
    if case == "malformed_jsonl":
        path = tmp_path / "f.jsonl"
        path.write_text('{"question": "q?", "answer": "a"}\n{"question": "q?", "answer": \n')
        return {"data.forget": path}
    if case == "missing_answer_column":
        return {"data.forget": write_jsonl(tmp_path / "f.jsonl", [{"question": "q?", "reply": "a"}])}
    if case == "empty_forget":
        return {"data.forget": write_jsonl(tmp_path / "f.jsonl", [])}
    if case == "answer_truncated":
        return {"data.forget": write_jsonl(tmp_path / "f.jsonl", [{"question": "Who? " * 80, "answer": "Ann."}])}
    assert case == "missing_model"
    return {"model.name_or_path": tmp_path / "no-such-model"}


@pytest.mark.parametrize(
    "case",
    ["missing_file", "malformed_jsonl", "missing_answer_column", "empty_forget", "answer_truncated", "missing_model"],
)
def test_overwrite_keeps_the_old_run_when_the_new_inputs_are_bad(tiny, tmp_path, finished_run, case):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    extra = {"method.name": "npo", "run.overwrite": True, **bad_input(case, tmp_path)}
    with pytest.raises((ValueError, FileNotFoundError)):
        train(tiny_config(tiny, out, **extra))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run")) == []


def test_overwrite_restores_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(
    tiny, tmp_path, finished_run, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    crash_at(monkeypatch, 2)
    extra = {"method.name": "npo", "run.overwrite": True, "optim.max_steps": 4, "run.checkpoint_every": 3}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tiny, out, **extra))
    assert snapshot(out) == before
    monkeypatch.undo()
    train(tiny_config(tiny, out, **extra))  # now it replaces the old run
    assert metrics_steps(out) == [1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_exported_weights_are_as_readable_as_the_rest_of_the_folder(tiny, tmp_path):
    result = train(tiny_config(tiny, tmp_path / "run", **{"optim.max_steps": 1}))
    final = Path(result["final"])
    modes = {f.name: f.stat().st_mode & 0o777 for f in final.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_checkpoint_from_before_a_new_key_still_resumes_at_its_default():
    from omegaconf import OmegaConf

    from fastnpo.train.config import Config, trajectory_differences

    current = OmegaConf.to_container(OmegaConf.structured(Config()))
    saved = OmegaConf.to_container(OmegaConf.structured(Config()))
    del saved["optim"]["name"], saved["method"]["delta"]  # keys added after the checkpoint
    assert trajectory_differences(saved, current) == []
    current["optim"]["name"] = "adamw_kahan"
    assert trajectory_differences(saved, current) == ["optim.name: 'adamw' -> 'adamw_kahan'"]
