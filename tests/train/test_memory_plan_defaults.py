"""`fastnpo plan` tells the truth by default (issue 22, item 5): the dtype comes from the model's
config when the run config does not set model.dtype; a run config carries the GPU memory it is
meant for (run.gpu_memory_gib; --gpu-memory overrides it); a plan that does not fit exits with
EXIT_DOES_NOT_FIT (3); the README's plan command plans what its text says. Local files only."""

import json
import re
import shlex
from pathlib import Path

import pytest

from fastnpo.cli import build_parser, main, run_plan
from fastnpo.config import ConfigError, load_structured
from fastnpo.train import memory_plan
from fastnpo.train.config import Config, load_config
from fastnpo.train.memory_plan import EXIT_DOES_NOT_FIT

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_folder(path: Path, **dtype) -> str:
    """A model folder holding only config.json (what the planner reads), with the given dtype key."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY, **dtype}))
    return str(path)


def saved_folder(path: Path, dtype: str) -> str:
    """config.json as this transformers version writes it (transformers 5: "dtype")."""
    from transformers import LlamaConfig

    values = {k: v for k, v in TINY.items() if k != "model_type"}
    LlamaConfig(**values, dtype=dtype).save_pretrained(path)
    return str(path)


def planned(argv: list[str]) -> dict:
    return run_plan(build_parser().parse_args(["plan", "--json", *argv]))


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(memory_plan, "visible_gpu_gib", lambda: None)


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------- the dtype


def test_dtype_defaults_to_the_model_config(tmp_path, no_gpu):
    saved = saved_folder(tmp_path / "saved", "bfloat16")
    assert '"dtype": "bfloat16"' in (tmp_path / "saved" / "config.json").read_text()
    result = planned(["--model", saved])
    assert result["settings"]["dtype"] == "bfloat16"
    assert result["shape"]["config_dtype"] == "bfloat16"
    assert result["dtype_source"] == "auto: named in the model's config"
    # a config.json written before transformers 5 names it torch_dtype
    old = tiny_folder(tmp_path / "old", torch_dtype="float16")
    assert planned(["--model", old])["settings"]["dtype"] == "float16"
    # none named: float32, and the plan says why
    bare = planned(["--model", tiny_folder(tmp_path / "bare")])
    assert bare["settings"]["dtype"] == "float32" and bare["dtype_source"] == "auto: the model's config names none"
    # a dtype fastnpo does not train in is not taken
    assert planned(["--model", tiny_folder(tmp_path / "f64", torch_dtype="float64")])["settings"]["dtype"] == "float32"


def test_a_dtype_the_run_config_sets_wins(tmp_path, no_gpu):
    folder = saved_folder(tmp_path / "model", "bfloat16")
    override = planned(["--model", folder, "model.dtype=float32"])
    assert override["settings"]["dtype"] == "float32" and override["dtype_source"] == "set in the run config"
    config = write_config(tmp_path / "run.yaml", f"model:\n  name_or_path: {folder}\n  dtype: float32\n")
    assert planned(["--config", config])["settings"]["dtype"] == "float32"
    assert planned(["--config", config, "model.dtype=float16"])["settings"]["dtype"] == "float16"
    # a config that sets other model keys only leaves the dtype to the model
    unset = write_config(tmp_path / "unset.yaml", f"model:\n  name_or_path: {folder}\n")
    assert planned(["--config", unset])["settings"]["dtype"] == "bfloat16"


def test_the_printed_plan_names_where_dtype_and_memory_came_from(tmp_path, no_gpu, capsys):
    folder = saved_folder(tmp_path / "model", "bfloat16")
    assert main(["plan", "--model", folder, "--gpu-memory", "24"]) == 0
    table = capsys.readouterr().out
    assert "model.dtype=bfloat16 (auto: named in the model's config)" in table
    assert "1 GPU x 24.0 GiB (--gpu-memory)" in table


def test_known_models_carry_their_hub_dtype(no_gpu):
    result = planned(["--model", "meta-llama/Llama-3.2-1B"])
    assert result["settings"]["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------- GPU memory


def test_gpu_memory_precedence_flag_config_visible_default(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path / "model")
    config = write_config(tmp_path / "run.yaml", f"model:\n  name_or_path: {folder}\nrun:\n  gpu_memory_gib: 40\n")
    monkeypatch.setattr(memory_plan, "visible_gpu_gib", lambda: 24.0)
    result = planned(["--config", config])
    assert (result["gpu_memory_gib"], result["gpu_memory_source"]) == (40.0, "run.gpu_memory_gib")
    flag = planned(["--config", config, "--gpu-memory", "16"])
    assert (flag["gpu_memory_gib"], flag["gpu_memory_source"]) == (16.0, "--gpu-memory")
    override = planned(["--config", config, "run.gpu_memory_gib=48"])
    assert override["gpu_memory_gib"] == 48.0
    visible = planned(["--model", folder])
    assert (visible["gpu_memory_gib"], visible["gpu_memory_source"]) == (24.0, "the visible GPU")
    monkeypatch.setattr(memory_plan, "visible_gpu_gib", lambda: None)
    default = planned(["--model", folder])
    assert default["gpu_memory_gib"] == memory_plan.DEFAULT_GPU_GIB
    assert default["gpu_memory_source"].startswith("the default")


def test_the_40gb_config_plans_against_40_gib(no_gpu):
    config = load_structured(Config, REPO / "configs" / "llama31_8b_npo_1gpu_40gb.yaml")
    assert config.run.gpu_memory_gib == 40
    result = memory_plan.plan(config)
    assert (result["gpu_memory_gib"], result["gpu_memory_source"]) == (40.0, "run.gpu_memory_gib")
    assert result["fits"]
    assert load_structured(Config, REPO / "configs" / "llama31_70b_npo_8gpu.yaml").run.gpu_memory_gib == 80


@pytest.mark.parametrize("value", ["0", "-8", "nan", "inf"])
def test_bad_gpu_memory_in_the_config_names_the_key(tmp_path, value, capsys):
    with pytest.raises(ConfigError, match=r"run\.gpu_memory_gib: must be a positive number of GiB"):
        load_structured(Config, None, [f"run.gpu_memory_gib={value}"])
    config = write_config(tmp_path / "run.yaml", f"model:\n  name_or_path: x\nrun:\n  gpu_memory_gib: {value}\n")
    assert main(["plan", "--config", config]) == 2
    assert "run.gpu_memory_gib" in capsys.readouterr().err


def test_print_config_shows_the_key(capsys):
    assert main(["train", "--print-config", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]) == 0
    assert "gpu_memory_gib: null" in capsys.readouterr().out
    assert load_config(REPO / "configs" / "tiny_cpu.yaml", ["run.gpu_memory_gib=12.5"]).run.gpu_memory_gib == 12.5


# ------------------------------------------------------------------------------- exit status


def test_a_plan_that_does_not_fit_exits_3(tmp_path, no_gpu, capsys):
    folder = tiny_folder(tmp_path / "model")
    assert EXIT_DOES_NOT_FIT == 3
    assert main(["plan", "--model", folder, "--gpu-memory", "80"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "--model", folder, "--gpu-memory", "0.5"]) == EXIT_DOES_NOT_FIT  # the CUDA context alone
    assert "does NOT fit" in capsys.readouterr().out
    # --json prints the JSON and exits the same way
    assert main(["plan", "--model", folder, "--gpu-memory", "0.5", "--json"]) == EXIT_DOES_NOT_FIT
    assert json.loads(capsys.readouterr().out)["fits"] is False
    # from the config's own memory too
    config = write_config(tmp_path / "run.yaml", f"model:\n  name_or_path: {folder}\nrun:\n  gpu_memory_gib: 0.5\n")
    assert main(["plan", "--config", config]) == EXIT_DOES_NOT_FIT
    assert main(["plan", "--config", config, "--gpu-memory", "80"]) == 0


def test_the_exit_status_is_documented():
    plan_parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    assert "3 when it does not" in plan_parser.description and str(EXIT_DOES_NOT_FIT) == "3"
    for doc in (REPO / "docs" / "will_it_fit.md",):  # the README's "Will it fit?" moved there
        assert re.search(r"exit(s| status| code)[^.]*\b3\b", readme_section(doc.read_text(), "Will it fit?"), re.I), doc


# ------------------------------------------------------------------------------- the README


def readme_section(text: str, title: str) -> str:
    start = text.index(f"# {title}")
    following = re.search(r"^## ", text[start + len(title) + 2 :], re.M)
    return text[start : start + len(title) + 2 + following.start()] if following else text[start:]


def plan_commands(section: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.strip().startswith("fastnpo plan")]
    return [shlex.split(line, comments=True)[2:] for line in lines]


def test_readme_plan_command_plans_what_its_text_says(no_gpu, monkeypatch):
    """The text: 'full-parameter NPO+RT on Llama-3.1-8B at 512 tokens, micro-batch 4 + 4 with
    activation checkpointing, needs about 80 GiB'. The command must plan that run."""
    monkeypatch.chdir(REPO)  # the commands name configs/ relative to the repository
    section = readme_section((REPO / "docs" / "will_it_fit.md").read_text(), "Will it fit?")  # moved from README
    assert "NPO+RT on Llama-3.1-8B at 512 tokens, micro-batch 4 + 4" in " ".join(section.split())
    commands = plan_commands(section)
    eight_b = [argv for argv in commands if "meta-llama/Llama-3.1-8B" in argv]
    assert eight_b, commands
    result = planned([a for a in eight_b[0] if a != "--json"])
    s = result["settings"]
    assert result["method"] == "npo_rt" and s["rows"] == 8 and s["seq_len"] == 512
    assert s["activation_checkpointing"] and s["dtype"] == "bfloat16" and result["trainable_params"] > 8e9
    assert 75 < result["total_gib"] <= result["gpu_memory_gib"] == 80.0 and result["fits"]
    for argv in commands:  # every command in the section runs offline and plans a run that fits
        assert main(["plan", *argv, *([] if "--json" in argv else ["--json"])]) == 0, argv


def test_the_trainer_resolves_auto_as_the_plan_plans_it(tmp_path, no_gpu):
    """`fastnpo plan` and `fastnpo train` read model.dtype=auto the same way (one rule, in modeling)."""
    from fastnpo.train import load_config
    from fastnpo.train.setup import resolve_model_dtype

    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        folder = saved_folder(tmp_path / name, dtype)
        config = write_config(tmp_path / f"{name}.yaml", f"model:\n  name_or_path: {folder}\n")
        lines = []
        trained = resolve_model_dtype(load_config(config, ["data.forget=x", "run.output_dir=y"]), lines.append)
        assert trained.model.dtype == planned(["--config", config])["settings"]["dtype"] == dtype
        assert lines[0] == f"model.dtype=auto: {dtype} (the model's config)"
        # plain AdamW on 16-bit parameters is said, not refused
        assert any("plain AdamW on bfloat16" in line for line in lines) == (dtype == "bfloat16")


def test_an_override_that_is_not_yaml_is_planned(tmp_path, no_gpu):
    """A template override (not valid YAML) is a string for the plan as for the trainer."""
    folder = saved_folder(tmp_path / "model", "bfloat16")
    result = planned(["--model", folder, "data.template=[INST] {question} [/INST]"])
    assert result["settings"]["dtype"] == "bfloat16"
