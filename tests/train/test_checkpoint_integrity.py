"""Checkpoints prove their integrity (checksums.json): a resume verifies the newest checkpoint,
falls back to the previous intact one naming the damaged file, and refuses in one line naming
the file when none is intact."""

import json
import re

import pytest
import torch
from helpers import REPO, interrupted_in_step, tiny_config, tiny_overrides
from test_train import final_weights

from fastnpo.train import train

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

COMMON = {"optim.max_steps": 6, "run.checkpoint_every": 2, "method.name": "npo_rt"}


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """An uninterrupted run's final weights."""
    root = tmp_path_factory.mktemp("straight")
    train(tiny_config(tiny, root / "run", **COMMON, **{"run.cache_dir": root / "cache"}))
    return final_weights(root / "run")


def stopped_run(tiny, tmp_path):
    """A run interrupted in step 5, after its step-2 and step-4 checkpoints."""
    with interrupted_in_step(5), pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny, tmp_path / "run", **COMMON, **{"run.cache_dir": tmp_path / "cache"}))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4"]
    return checkpoints


def distcp(checkpoint):
    files = sorted(checkpoint.glob("*.distcp"))
    assert files, list(checkpoint.iterdir())
    return max(files, key=lambda f: f.stat().st_size)


def flip_middle(file, count=64):
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    file.write_bytes(bytes(data))


def test_every_file_is_recorded_with_its_size_and_sha256(tiny, tmp_path, monkeypatch):
    checkpoints = stopped_run(tiny, tmp_path)
    step = checkpoints / "step_4"
    recorded = json.loads((step / "checksums.json").read_text())
    on_disk = {p.name for p in step.iterdir()} - {"checksums.json"}
    assert set(recorded) == on_disk and "trainer.json" in on_disk and "rng_rank0.pt" in on_disk
    for name, digest in recorded.items():
        assert digest["bytes"] == (step / name).stat().st_size


@pytest.mark.parametrize("damage", ["flip_64_bytes", "truncate_to_zero"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tiny, tmp_path, monkeypatch, capsys, straight, damage
):
    checkpoints = stopped_run(tiny, tmp_path)
    damaged = distcp(checkpoints / "step_4")
    size = damaged.stat().st_size
    if damage == "flip_64_bytes":
        flip_middle(damaged)
        assert damaged.stat().st_size == size
    else:
        damaged.write_bytes(b"")
    capsys.readouterr()
    train(tiny_config(tiny, tmp_path / "run", **COMMON, **{"run.cache_dir": tmp_path / "cache"}))
    output = capsys.readouterr().out
    assert f"{damaged} " in output and "falling back" in output, output
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in output, output
    resumed = final_weights(tmp_path / "run")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_no_intact_checkpoint_fails_in_one_line_naming_the_file(tiny, tmp_path, monkeypatch, capsys):
    from fastnpo.cli import main

    checkpoints = stopped_run(tiny, tmp_path)
    newest, older = distcp(checkpoints / "step_4"), checkpoints / "step_2" / "trainer.json"
    flip_middle(newest)
    older.write_text(older.read_text()[: len(older.read_text()) // 2])  # cut short
    capsys.readouterr()
    args = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    code = main(args + tiny_overrides(tiny, tmp_path / "run", **COMMON, **{"run.cache_dir": tmp_path / "cache"}))
    error = capsys.readouterr().err
    assert code == 2, error
    line = error.splitlines()[0]
    assert "no intact checkpoint" in line and str(newest) in line and str(older) in line, error
    assert not (tmp_path / "run" / "final").exists()


def test_a_checkpoint_without_checksums_is_resumed_with_a_log_line(tiny, tmp_path, monkeypatch, capsys, straight):
    """Written by an older fastnpo: accepted as it is."""
    checkpoints = stopped_run(tiny, tmp_path)
    for step in ("step_2", "step_4"):
        (checkpoints / step / "checksums.json").unlink()
    capsys.readouterr()
    train(tiny_config(tiny, tmp_path / "run", **COMMON, **{"run.cache_dir": tmp_path / "cache"}))
    output = capsys.readouterr().out
    assert "no checksums.json" in output and f"resumed from {checkpoints / 'step_4'} at step 4" in output, output
    resumed = final_weights(tmp_path / "run")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_unreadable_trainer_state_and_missing_rng_name_the_file(tiny, tmp_path, monkeypatch):
    """Without checksums (an older checkpoint) the loader itself names the file it cannot read."""
    checkpoints = stopped_run(tiny, tmp_path)
    for step in ("step_2", "step_4"):
        (checkpoints / step / "checksums.json").unlink()
    trainer = checkpoints / "step_4" / "trainer.json"
    intact = trainer.read_text()
    trainer.write_text(intact[:100])
    config = tiny_config(tiny, tmp_path / "run", **COMMON, **{"run.cache_dir": tmp_path / "cache"})
    with pytest.raises(ValueError, match=re.escape(f"{trainer} is not valid JSON")):
        train(config)
    trainer.write_text(intact)
    rng = checkpoints / "step_4" / "rng_rank0.pt"
    rng_state = rng.read_bytes()
    rng.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{rng} is missing")):
        train(config)
    rng.write_bytes(rng_state)
    distcp(checkpoints / "step_4").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {checkpoints / 'step_4'}: its weights could not")):
        train(config)


def test_the_export_records_and_verifies_its_checksums_before_final_appears(tiny, tmp_path, monkeypatch):
    from fastnpo.train import checkpoint

    config = tiny_config(tiny, tmp_path / "run", **{"method.name": "npo", "run.cache_dir": tmp_path / "cache"})
    train(config)
    final = tmp_path / "run" / "final"
    recorded = json.loads((final / "checksums.json").read_text())
    assert "model.safetensors" in recorded and checkpoint.checkpoint_problem(final) is None

    real = checkpoint.checkpoint_problem

    def damaged_on_read_back(path):
        (path / "model.safetensors").write_bytes(b"")
        return real(path)

    monkeypatch.setattr(checkpoint, "checkpoint_problem", damaged_on_read_back)
    other = tmp_path / "other"
    with pytest.raises(OSError, match=re.escape("model.safetensors has 0 bytes")):
        train(tiny_config(tiny, other, **{"method.name": "npo", "run.cache_dir": tmp_path / "cache"}))
    assert not (other / "final").exists()
