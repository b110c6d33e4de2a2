"""Errors before work, in one line, never a traceback (issue 22 item 4): override values that are
not YAML, nested key typos, `demo --out` checked before the imports, a model name that is neither
a local folder nor reachable (offline, or no network) answered in under 2 s."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastnpo import cli, files
from fastnpo.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.name_or_path=x", "data.forget=y", "data.retain=z"]


def train_config(overrides):
    from fastnpo.train import load_config

    return load_config(None, [*BASE, *overrides])


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "template", ["[INST] {question} [/INST]", "Question: {question} Answer:", "Q: {question}", "{question}?"]
)
def test_an_override_value_that_is_not_yaml_is_taken_as_a_string(template):
    # Today: a yaml.parser.ParserError traceback (or "Cannot convert 'DictConfig' to string").
    assert train_config([f"data.template={template}"]).data.template == template


def test_override_values_still_parse_as_yaml_where_they_can():
    config = train_config(["optim.betas=[0.8,0.9]", "optim.lr=2e-5", "model.lora.enabled=true"])
    assert config.optim.betas == [0.8, 0.9] and config.optim.lr == 2e-5 and config.model.lora.enabled is True
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train_config(["optim.lr=[1, 2"])  # not YAML, and not a number as a string either


def test_cli_takes_a_template_with_brackets_as_one_override(capsys):
    argv = [
        "train",
        "--print-config",
        "--config",
        str(REPO / "configs/tiny_cpu.yaml"),
        "data.template=Q: {question} A:",
    ]
    assert cli.main(argv) == 0
    assert "template: 'Q: {question} A:'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,closest",
    [("model.lora.rnak=4", "r"), ("model.lora.alhpa=4", "alpha"), ("optim.lrr=1", "lr"), ("modle.dtype=x", "model")],
)
def test_a_key_typo_names_the_closest_valid_key(override, closest):
    with pytest.raises(ConfigError) as caught:
        train_config([override])
    message = str(caught.value)
    assert message.startswith(override.split("=")[0].split(".")[0]) and f"Did you mean '{closest}'?" in message
    assert message.count("Did you mean") == 1 and "\n" not in message


def test_a_nested_key_typo_in_a_file_names_the_closest_key_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: x\n  lora:\n    rnak: 4\n")
    with pytest.raises(ConfigError, match=r"model\.lora\.rnak: .*Did you mean 'r'\?"):
        train_config_from(path)


def train_config_from(path):
    from fastnpo.train import load_config

    return load_config(path, ["data.forget=y"])


# ----------------------------------------------------------------------------- Ctrl-C


def test_after_the_first_ctrl_c_a_second_one_kills_at_once(python_sigint):
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), cli._second_ctrl_c_kills():
        signal.raise_signal(signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on the way out
    seen = []
    with pytest.raises(KeyboardInterrupt), cli._second_ctrl_c_kills():
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            seen.append(signal.getsignal(signal.SIGINT))
    assert seen == [signal.SIG_DFL]  # during the cleanup after the first: the default action, death


# ----------------------------------------------------------------------------- demo --out


@pytest.mark.torchrun
def test_demo_refuses_a_used_out_before_importing_torch(tmp_path):
    # Today: refused only after the demo's imports (torch, transformers: 10 s).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    (tmp_path / "file").write_text("mine")
    code = (
        "import sys\n"
        "from fastnpo import cli\n"
        "codes = [cli.main(['demo', '--out', sys.argv[1]]), cli.main(['demo', '--out', sys.argv[2], '--overwrite'])]\n"
        "assert codes == [2, 2], codes\n"
        "assert 'torch' not in sys.modules, 'demo imported torch before refusing --out'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "file")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastnpo demo: error:")]
    assert len(errors) == 2 and "already holds a run; set --overwrite" in errors[0], done.stderr
    assert "is a file" in errors[1] and (tmp_path / "file").read_text() == "mine"
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- model sources


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub-cache"


@pytest.mark.parametrize("env", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_model_name_is_refused_at_once(empty_hub_cache, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    monkeypatch.setattr(files, "hub_reachable", lambda: pytest.fail("offline: the hub must not be asked"))
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"--model 'my-unlearned-llama' is neither a local folder.*{env}=1"):
        files.check_model_source("my-unlearned-llama", "--model")
    assert time.perf_counter() - started < 2


def test_unreachable_hub_is_refused_at_once(empty_hub_cache, monkeypatch):
    monkeypatch.setattr(files, "hub_reachable", lambda: False)
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path 'org/model' is neither a local folder.*reach"):
        files.check_model_source("org/model", "model.name_or_path")


def test_the_reachability_probe_gives_up_within_2_s(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://192.0.2.1")  # TEST-NET-1: refused, or no answer
    started = time.perf_counter()
    assert files.hub_reachable() is False
    assert time.perf_counter() - started < 2

    class Hanging:  # a name lookup or connect that ignores the timeout
        def head(self, url, timeout):
            time.sleep(5)

    monkeypatch.setattr(huggingface_hub, "get_session", Hanging)
    started = time.perf_counter()
    assert files.hub_reachable() is False
    assert time.perf_counter() - started < 2


def test_local_folders_and_cached_hub_names_pass_offline(empty_hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model").mkdir()
    files.check_model_source(str(tmp_path / "model"), "--model")
    snapshot = empty_hub_cache / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_hub_cache / "models--org--cached" / "refs").mkdir()
    (empty_hub_cache / "models--org--cached" / "refs" / "main").write_text("abc")
    files.check_model_source("org/cached", "--model")  # transformers loads it from the cache offline


def test_a_missing_path_is_named_without_asking_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(files, "hub_reachable", lambda: pytest.fail("a path is not a hub name"))
    with pytest.raises(FileNotFoundError, match=r"model\.tokenizer '.*no/such/folder': no such folder"):
        files.check_model_source(str(tmp_path / "no" / "such" / "folder"), "model.tokenizer")


@pytest.mark.parametrize("offline", [True, False])
def test_eval_names_the_model_option_in_under_2_s(empty_hub_cache, monkeypatch, capsys, tmp_path, offline):
    # Today: 53 s of retries, then an error about "tokenizer 'my-unlearned-llama'".
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(files, "hub_reachable", lambda: False)
    started = time.perf_counter()
    assert cli.main(["eval", "--model", "my-unlearned-llama", "--data", str(tmp_path)]) == 2
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err
    assert "fastnpo eval: error: --model 'my-unlearned-llama' is neither a local folder" in err
    assert "tokenizer" not in err


def test_hub_offline_env_values():
    assert files.offline_env({"HF_HUB_OFFLINE": "1"}) == "HF_HUB_OFFLINE=1"
    assert files.offline_env({"TRANSFORMERS_OFFLINE": "true"}) == "TRANSFORMERS_OFFLINE=true"
    assert files.offline_env({"HF_HUB_OFFLINE": "0"}) is None and files.offline_env({}) is None


def test_output_folder_problems(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert files.folder_problem(tmp_path / "new" / "deeper") is None
    assert "is a file" in files.folder_problem(tmp_path / "file")
    assert "is a file" in files.folder_problem(tmp_path / "file" / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else real(path, mode))
    assert f"{tmp_path} is not writable" in files.folder_problem(tmp_path / "run")


def test_a_key_like_no_valid_key_lists_them_instead_of_guessing():
    from fastnpo.config import ConfigError
    from fastnpo.train import load_config

    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.lora.zzzz=4"])
    message = str(error.value)
    assert "Did you mean" not in message and "Valid keys: enabled, r, alpha, dropout, target_modules" in message
