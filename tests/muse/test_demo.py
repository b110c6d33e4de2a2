"""The MUSE demo at smoke size: every stage runs and writes its table and plot."""

import json
import time

import pytest

from fastnpo.muse.demo import COLUMNS, PRESETS, main, results_table, run_muse_demo


@pytest.mark.torchrun
def test_demo_smoke_run(tmp_path):
    started = time.perf_counter()
    lines = []
    results = run_muse_demo(tmp_path / "demo", "tiny", log=lines.append)
    elapsed = time.perf_counter() - started
    out = tmp_path / "demo"
    for name in (
        "results.json",
        "results.md",
        "muse_results.png",
        "data/manifest.json",
        "target/final",
        "retrain/final",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text())["runs"].keys() == {"ga", "npo"}
    for method in ("ga", "npo"):
        epochs = results["runs"][method]
        assert [e["epoch"] for e in epochs] == [0, 1]
        assert set(COLUMNS) <= set(epochs[-1])
    assert results["retrain"]["privleak"] == 0.0  # against itself
    table = (out / "results.md").read_text()
    assert table.strip() == results_table(results) and "| GA (epoch 1) |" in table and "| NPO (epoch 1) |" in table
    assert any("fine-tune target and retrained model done" in line for line in lines)
    assert elapsed < 60, f"the smoke run took {elapsed:.0f} s"


def test_demo_refuses_a_used_folder_and_bad_arguments(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    with pytest.raises(ValueError, match="--out"):
        run_muse_demo(tmp_path / "used", "tiny")
    assert (tmp_path / "used" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="preset must be one of"):
        run_muse_demo(tmp_path / "a", "huge")
    with pytest.raises(ValueError, match="methods must be a non-empty list"):
        run_muse_demo(tmp_path / "b", "tiny", methods=["npo", "nope"])
    with pytest.raises(ValueError, match="seed must be"):
        run_muse_demo(tmp_path / "c", "tiny", seed=-1)
    assert main(["--out", str(tmp_path / "used"), "--preset", "tiny"]) == 2
    assert "--out" in capsys.readouterr().err
    assert set(PRESETS) == {"default", "tiny"}
