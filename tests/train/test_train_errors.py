"""Bad input gets one clear line naming the file, the line or key and the problem (exit code 2
through the CLI, no traceback), never a stack trace from a library (issue 13 item 5)."""

import subprocess
import sys

import pytest
from helpers import REPO, tiny_config, tiny_overrides

from fastnpo.config import ConfigError
from fastnpo.train import load_config, train


def broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: x\ndata: [forget: y\n")
    return path


def malformed_jsonl(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"question": "q?", "answer": "a"}\n{"question": "q?", "answer": \n')
    return path


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"broken\.yaml.* line 3"):
        load_config(broken_yaml(tmp_path))


def test_malformed_jsonl_line_names_the_set_the_file_and_the_line(tiny, tmp_path):
    extra = {"method.name": "npo", "data.forget": malformed_jsonl(tmp_path)}
    with pytest.raises(ValueError, match=r"forget set .*f\.jsonl.*line 2, column \d+: not valid JSON"):
        train(tiny_config(tiny, tmp_path / "run", **extra))


def test_missing_model_names_the_key(tiny, tmp_path):
    extra = {"method.name": "npo", "model.name_or_path": tmp_path / "no-such-model"}
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path .*no-such-model"):
        train(tiny_config(tiny, tmp_path / "run", **extra))


def test_model_folder_without_a_model_names_the_key(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    extra = {"method.name": "npo", "model.name_or_path": tmp_path / "empty"}
    with pytest.raises(ValueError, match=r"model\.name_or_path .*empty.*cannot load"):
        train(tiny_config(tiny, tmp_path / "run", **extra))


@pytest.mark.parametrize("case", ["yaml", "jsonl", "model"])
@pytest.mark.torchrun
def test_cli_says_one_line_and_exits_2(tiny, tmp_path, case):
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    extra = {"method.name": "npo"}
    if case == "yaml":
        config = str(broken_yaml(tmp_path))
    elif case == "jsonl":
        extra["data.forget"] = malformed_jsonl(tmp_path)
    else:
        extra["model.name_or_path"] = tmp_path / "no-such-model"
    args = ["train", "--config", config, *tiny_overrides(tiny, tmp_path / "run", **extra)]
    done = subprocess.run(
        [sys.executable, "-m", "fastnpo.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastnpo train: error:")]
    expected = {"yaml": "line 3", "jsonl": "line 2", "model": "model.name_or_path"}[case]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert not (tmp_path / "run").exists()
