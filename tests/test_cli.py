"""The `fastnpo` command's surface: fast help, help texts, --print-config, --debug (issue 14 item 5)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastnpo import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.torchrun
def test_help_imports_no_torch():
    # `fastnpo --help` took 2-12 s because `import fastnpo` imported torch before argparse ran.
    code = (
        "import sys, contextlib, io\n"
        "import fastnpo, fastnpo.cli\n"
        "for argv in ([], ['train'], ['cache-ref'], ['u2a'], ['demo'], ['eval'], ['prepare-tiny']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        fastnpo.cli.main([*argv, '--help'])\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
        "assert callable(fastnpo.npo_loss) and 'torch' in sys.modules  # the public API still loads on use\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def _subparser(name):
    actions = cli.build_parser()._subparsers._group_actions[0]
    return actions.choices[name]


@pytest.mark.parametrize("command", ["train", "cache-ref", "u2a", "demo", "eval", "prepare-tiny"])
def test_every_option_has_help(command):
    for action in _subparser(command)._actions:
        assert action.help, f"fastnpo {command} {action.option_strings or action.dest} has no help text"


def test_train_help_names_every_config_section_and_its_file():
    from fastnpo.train.config import Config

    epilog = _subparser("train").epilog
    for section in dataclasses.fields(Config):
        assert f"  {section.name}.*" in epilog, section.name
    for path in {word for word in epilog.split() if word.startswith("fastnpo/") and word.endswith(".py")}:
        assert (REPO / path).is_file(), f"train --help points to {path}, which does not exist"
    for path in {w.rstrip(",);") for w in _subparser("u2a").epilog.split() if w.startswith("fastnpo/")}:
        assert (REPO / path).is_file(), path


def test_print_config_shows_defaults_file_and_overrides(capsys):
    assert cli.main(["train", "--print-config", "--config", str(REPO / "configs/tiny_cpu.yaml"), "optim.lr=0.002"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.002" in printed and "forget_split: forget10" in printed and "keep_checkpoints: 2" in printed
    assert cli.main(["u2a", "--print-config", "bilevel.k=5"]) == 0
    assert "k: 5" in capsys.readouterr().out


def test_train_without_config_says_what_is_missing(capsys):
    assert cli.main(["train"]) == 2
    assert "--config is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--debug", "train", "--config", "missing.yaml"], ["train", "--debug", "--config", "missing.yaml"]]
)
def test_debug_flag_shows_the_traceback(argv, capsys, monkeypatch):
    from fastnpo.config import ConfigError

    monkeypatch.delenv("FASTNPO_DEBUG", raising=False)
    assert cli.main(["train", "--config", "missing.yaml"]) == 2
    assert "--debug" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        cli.main(argv)
    monkeypatch.setenv("FASTNPO_DEBUG", "1")  # still supported
    with pytest.raises(ConfigError):
        cli.main(["train", "--config", "missing.yaml"])
