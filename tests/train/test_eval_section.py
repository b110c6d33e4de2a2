"""The evaluation keys as their own `eval:` section, and run.cache_dir resolved when the config is
loaded (issue 25 item 4).

The nine run.eval_* / run.keep_best* / run.retain_stats keys moved to eval.*: an old key, in a
YAML file or an override, is refused naming its new one; a checkpoint whose config.yaml still has
the old keys resumes. An empty run.cache_dir is written in as the folder it means (ref-cache/
beside the output folder), so --print-config and config.yaml show it."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from helpers import REPO, interrupted_in_step, tiny_config

from fastnpo import cli
from fastnpo.train import train
from fastnpo.train.config import (
    RENAMED_KEYS,
    Config,
    ConfigError,
    EpochEvalConfig,
    RunConfig,
    load_config,
    to_yaml,
    trajectory_differences,
)
from fastnpo.train.setup import reference_cache_dir

TINY_CPU = REPO / "configs" / "tiny_cpu.yaml"
# The keys' values before the move: the defaults stay the same.
OLD_DEFAULTS = {
    "run.eval_every_epoch": False,
    "run.eval_data": "",
    "run.eval_forget_split": "forget10",
    "run.retain_stats": "",
    "run.eval_max_examples": 300,
    "run.eval_max_new_tokens": 48,
    "run.eval_generate": True,
    "run.keep_best": "",
    "run.keep_best_mode": "max",
}
SOME_VALUE = {bool: "true", str: "x", int: "5"}


def test_the_nine_keys_moved_with_their_defaults():
    assert set(RENAMED_KEYS) == set(OLD_DEFAULTS)
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    eval_section = EpochEvalConfig()
    for old, new in RENAMED_KEYS.items():
        assert old.split(".", 1)[1] not in run_keys, old
        section, key = new.split(".")
        assert section == "eval"
        assert getattr(eval_section, key) == OLD_DEFAULTS[old], new
    assert Config().eval == eval_section


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_an_old_key_as_an_override_is_refused_naming_the_new_one(old):
    value = SOME_VALUE[type(OLD_DEFAULTS[old])]
    with pytest.raises(ConfigError, match=rf"^{old} is now {RENAMED_KEYS[old]} ".replace(".", r"\.")):
        load_config(TINY_CPU, [f"{old}={value}"])


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_an_old_key_in_a_config_file_is_refused_naming_the_new_one(old, tmp_path):
    text = yaml.safe_load(TINY_CPU.read_text())
    text["run"][old.split(".", 1)[1]] = OLD_DEFAULTS[old]  # even at its default
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{old} is now {RENAMED_KEYS[old]} (config file {path})"


def test_the_message_reads_as_the_issue_asks():
    with pytest.raises(ConfigError, match=r"^run\.eval_every_epoch is now eval\.every_epoch"):
        load_config(TINY_CPU, ["run.eval_every_epoch=true"])


def test_the_cli_refuses_an_old_key_in_one_line(capsys):
    assert cli.main(["train", "--print-config", "--config", str(TINY_CPU), "run.keep_best=forget_quality"]) == 2
    assert "run.keep_best is now eval.keep_best" in capsys.readouterr().err


def test_the_eval_section_is_checked_naming_its_keys(tmp_path):
    for overrides, key in [
        (["eval.keep_best=forget_quality"], "eval.keep_best"),  # needs eval.every_epoch
        (["eval.keep_best_mode=highest"], "eval.keep_best_mode"),
        (["eval.every_epoch=true"], "eval.data"),  # required by every_epoch
        (["eval.every_epoch=true", "eval.data=d", "eval.max_examples=0"], "eval.max_examples"),
        (["eval.every_epoch=true", "eval.data=d", "eval.max_new_tokens=0"], "eval.max_new_tokens"),
        (["eval.every_epoch=true", "eval.data=d", f"eval.retain_stats={tmp_path / 'no.json'}"], "eval.retain_stats"),
    ]:
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
            load_config(TINY_CPU, overrides)
    config = load_config(TINY_CPU, ["eval.every_epoch=true", "eval.data=d", "eval.keep_best=x", "eval.generate=false"])
    assert config.eval.every_epoch and config.eval.data == "d" and config.eval.keep_best == "x"
    assert "eval:\n  every_epoch: true\n  data: d\n" in to_yaml(config)


def test_the_eval_keys_do_not_change_the_trajectory():
    base = load_config(TINY_CPU)
    other = load_config(TINY_CPU, ["eval.every_epoch=true", "eval.data=d", "eval.keep_best=x", "eval.max_examples=3"])
    assert trajectory_differences(dataclass_dict(base), dataclass_dict(other)) == []


def old_format(saved: dict) -> dict:
    """A config.yaml as written before the eval section: its keys flat in run, cache_dir as given."""
    section = saved.pop("eval")
    for old, new in RENAMED_KEYS.items():
        saved["run"][old.split(".", 1)[1]] = section[new.split(".", 1)[1]]
    saved["run"]["cache_dir"] = ""
    return saved


def dataclass_dict(config: Config) -> dict:
    return yaml.safe_load(to_yaml(config))


def test_a_saved_config_from_before_the_move_compares_as_the_same_trajectory():
    current = dataclass_dict(load_config(TINY_CPU))
    assert trajectory_differences(old_format(dataclass_dict(load_config(TINY_CPU))), current) == []


def test_a_checkpoint_saved_before_the_move_resumes(tiny, tmp_path):
    out = tmp_path / "runs" / "stopped"
    common = {"method.name": "npo", "optim.max_steps": 3, "run.checkpoint_every": 1}
    with interrupted_in_step(3), pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny, out, **common))
    assert (out / "checkpoints" / "step_2").is_dir()
    (out / "config.yaml").write_text(yaml.safe_dump(old_format(yaml.safe_load((out / "config.yaml").read_text()))))
    result = train(tiny_config(tiny, out, **common))
    assert result["steps"] == 3 and result["reference_cache_hit"] is True
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert "eval_every_epoch" not in saved["run"] and saved["eval"]["every_epoch"] is False
    # the default cache folder, the same as before the move: ref-cache/ beside the output folder
    assert saved["run"]["cache_dir"] == str(tmp_path / "runs" / "ref-cache")
    assert list((tmp_path / "runs" / "ref-cache").glob("ref-logprobs-*.safetensors"))


# ----------------------------------------------------------------------------- run.cache_dir


def test_an_empty_cache_dir_is_resolved_when_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(TINY_CPU, ["run.output_dir=runs/a"])
    assert config.run.cache_dir == str(tmp_path / "runs" / "ref-cache")
    assert reference_cache_dir(config) == tmp_path / "runs" / "ref-cache"
    assert f"cache_dir: {tmp_path / 'runs' / 'ref-cache'}\n" in to_yaml(config)
    # a value that is set is kept as written
    assert load_config(TINY_CPU, ["run.cache_dir=my/cache"]).run.cache_dir == "my/cache"


def test_print_config_shows_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--print-config", "--config", str(TINY_CPU), "run.output_dir=out/x"]) == 0
    assert f"cache_dir: {tmp_path / 'out' / 'ref-cache'}\n" in capsys.readouterr().out


def test_a_config_built_without_the_loader_means_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config(run=RunConfig(output_dir="runs/b"))
    assert config.run.cache_dir == ""
    assert reference_cache_dir(config) == Path(load_config(TINY_CPU, ["run.output_dir=runs/b"]).run.cache_dir)


def test_add_reference_logprobs_keeps_an_empty_cache_dir_in_memory(tiny, tmp_path, monkeypatch):
    # "" meant the working directory (Path("")) here; it now means no on-disk cache, as None and U2A's "".
    from transformers import AutoModelForCausalLM

    from fastnpo.integrations.hf.data import add_reference_logprobs

    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    rows = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 8, 9], "labels": [-100, 8, 9]}]
    out = add_reference_logprobs(rows, model, pad_token_id=0, cache_dir="")
    assert len(out) == 2 and all("ref_logp" in row for row in out)
    assert list(tmp_path.iterdir()) == []
