"""One policy for every command that writes a folder (issue 14 item 4): a non-empty output is
refused, in train's words ("already holds a run; set ... to replace it"), unless overwrite is set."""

import json

import pytest

from fastnpo import cli
from fastnpo.config import ConfigError


def test_prepare_tiny_refuses_an_existing_setup_and_replaces_it_on_overwrite(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli.main(["prepare-tiny", "--out", str(out)]) == 0
    manifest = (out / "data" / "manifest.json").read_text()
    base = (out / "base" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(["prepare-tiny", "--out", str(out), "--seed", "1"]) == 2
    assert "already holds a run; set --overwrite" in capsys.readouterr().err
    assert (out / "data" / "manifest.json").read_text() == manifest  # untouched
    assert (out / "base" / "model.safetensors").read_bytes() == base
    assert cli.main(["prepare-tiny", "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["seed"] == 1
    assert (out / "base" / "model.safetensors").read_bytes() != base


def test_prepare_tiny_accepts_an_empty_folder(tmp_path):
    # tmp_path exists and is empty: as good as a new folder.
    from fastnpo.tiny import TinyModelSpec
    from fastnpo.tofu.minitofu import prepare_tiny

    paths = prepare_tiny(
        tmp_path, num_authors=10, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64)
    )
    assert paths["base"].is_dir()


@pytest.mark.parametrize(
    ("command", "argument"),
    [
        (["u2a"], "run.output_dir={}"),
        (["prepare-tiny", "--out"], "{}"),
        (["prepare-tiny", "--overwrite", "--out"], "{}"),
    ],
)
def test_an_output_that_is_a_file_is_refused_in_one_line_naming_the_argument(tmp_path, capsys, command, argument):
    # Before: u2a wrote into it (NotADirectoryError traceback), prepare-tiny too.
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert cli.main([*command, argument.format(file)]) == 2
    err = capsys.readouterr().err
    name = "run.output_dir" if command == ["u2a"] else "--out"
    errors = [line for line in err.splitlines() if line.startswith(f"fastnpo {command[0]}: error:")]
    assert errors == [f"fastnpo {command[0]}: error: {name} {file} is a file, not a folder"], err
    assert "Traceback" not in err
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_u2a_refuses_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "u2a"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    assert cli.main(["u2a", f"run.output_dir={out}"]) == 2
    assert f"run.output_dir {out} already holds a run; set run.overwrite=true" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"earlier": true}'
    with pytest.raises(ConfigError, match="already holds a run"):
        from fastnpo.u2a import run_u2a

        run_u2a(None, [f"run.output_dir={out}"])


def test_demo_refuses_a_used_folder_and_overwrite_removes_only_its_own_entries(tmp_path, capsys):
    from fastnpo.tofu.demo import _prepare_out

    out = tmp_path / "demo"
    (out / "unlearn").mkdir(parents=True)
    (out / "results.md").write_text("old")
    (out / "retain90").mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--preset", "quick", "--out", str(out)]) == 2
    assert "already holds a run; set --overwrite" in capsys.readouterr().err
    assert (out / "results.md").read_text() == "old"
    _prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
