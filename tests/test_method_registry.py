"""The methods registry (fastnpo/methods/): each method owns its defaults, the flat config resolves
them through the method, and every method object answers what the trainer, the planner and the
demo ask it."""

import dataclasses
import inspect

import pytest

from fastnpo import cli
from fastnpo.config import ConfigError
from fastnpo.methods import METHODS, MethodConfig, method_for
from fastnpo.train import load_config

REQUIRED = ["model.name_or_path=some/model", "data.forget=some/forget", "data.retain=some/retain"]


def test_simnpo_runs_at_its_own_beta_through_the_config_and_the_cli(capsys, tmp_path):
    """`fastnpo train method.name=simnpo` runs SimNPO at its beta (2.5), not NPO's (0.1): the
    default lives in the method and the flat config resolves it once method.name is known."""
    assert load_config(None, [*REQUIRED, "method.name=simnpo"]).method.beta == 2.5
    assert load_config(None, [*REQUIRED, "method.name=npo"]).method.beta == 0.1
    assert load_config(None, [*REQUIRED, "method.name=simnpo", "method.beta=4.5"]).method.beta == 4.5
    config = tmp_path / "run.yaml"
    config.write_text("method:\n  name: simnpo\n")
    assert load_config(config, REQUIRED).method.beta == 2.5
    assert load_config(config, [*REQUIRED, "method.name=idkdpo"]).method.beta == 0.1
    # --print-config shows the value the run will use.
    assert cli.main(["train", "--print-config", *REQUIRED, "method.name=simnpo"]) == 0
    printed = capsys.readouterr().out
    assert "  beta: 2.5" in printed and "name: simnpo" in printed
    assert cli.main(["train", "--print-config", *REQUIRED]) == 0
    assert "  beta: 0.1" in capsys.readouterr().out


def test_the_hf_trainer_demo_and_config_share_one_simnpo_default():
    from fastnpo.integrations.hf.trainer import _method_config
    from fastnpo.losses import SIMNPO_BETA, simnpo_from_logprobs
    from fastnpo.methods.npo import SimNPO
    from fastnpo.tofu.demo import PRESETS

    assert SimNPO.defaults["beta"] == SIMNPO_BETA == 2.5
    assert inspect.signature(simnpo_from_logprobs).parameters["beta"].default == SIMNPO_BETA
    assert MethodConfig(name="simnpo").beta == SimNPO.defaults["beta"]
    assert _method_config("simnpo", None, 1.0, 1.0, False, {}).beta == SimNPO.defaults["beta"]
    assert _method_config("npo", None, 1.0, 1.0, False, {}).beta == 0.1
    assert _method_config("simnpo", 4.5, 1.0, 1.0, False, {}).beta == 4.5
    assert all(preset.beta is None for preset in PRESETS.values())  # each method's default


def test_every_key_is_resolved_for_every_method_and_bad_values_are_refused():
    for name in METHODS:
        config = MethodConfig(name=name)
        missing = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None]
        assert not missing, (name, missing)
    # A method's own key is checked whichever method runs (as before the registry).
    with pytest.raises(ConfigError, match=r"method\.wga_beta"):
        MethodConfig(name="npo", wga_beta=-1.0)
    with pytest.raises(ConfigError, match=r"method\.name"):
        MethodConfig(name="npo++")
    with pytest.raises(ConfigError, match=r"method\.beta"):
        MethodConfig(name="simnpo", beta=0.0)


def test_every_method_answers_the_registry_questions():
    assert list(METHODS) == [m.name for m in METHODS.values()]
    for name, method in METHODS.items():
        assert method_for(name) is method and method.label
        assert method.sets[0] == "forget" and set(method.ref_sets) <= set(method.sets)
        assert method.token_unit in ("tokens", "scored")
    with pytest.raises(ValueError, match=r"method\.name must be one of"):
        method_for("nope")
