"""README.md's and docs/*.md's code blocks, run as written (issue 14 item 3), so the docs cannot rot.

Every ```bash / ```python block must be classified below: a block nobody classified fails the
test. Cheap commands run as a user runs them, each a new `python -m fastnpo.cli` process started in a
scratch copy of the repository root (its top-level entries linked in, so the same folders are on
sys.path as in the root, and the root's runs/ is not touched); every trainer command's
config and overrides are loaded (unknown keys, bad values, two commands writing one folder);
every `fastnpo eval --model` must be a folder an earlier command of the same file creates. The
long CPU commands (training, evaluation: 15-60 s each on 2 cores) run only with
FASTNPO_DOCS_FULL=1; GPU-only and hub-only ones never run here, for the reasons listed.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnpo import cli
from fastnpo.train import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FULL = bool(os.environ.get("FASTNPO_DOCS_FULL"))

# Blocks that do not run here, found by a string they contain.
SKIPPED_BLOCKS = {
    "make demo": "the whole demo (minutes) and the whole test suite; the quick demo preset runs in "
    "tests/tofu/test_evaluation.py",
    "from fastnpo.integrations.hf import patch_model": "needs a Hugging Face model, trl and peft; "
    "tests/integrations/test_documented_routes.py runs it as written on a tiny model",
    'from_pretrained("meta-llama/Llama-3.2-1B"': "hub-only: downloads Llama-3.2-1B "
    "(tests/integrations/test_documented_routes.py runs it on a tiny model)",
    "trainer = transformers.Trainer(": "a fragment: model, args, data and collator come from the reader's code "
    "(tests/integrations/test_documented_routes.py supplies them)",
    'load_dataset("locuslab/TOFU"': "hub-only: downloads locuslab/TOFU and needs a model and tokenizer "
    "(tests/integrations/test_documented_routes.py runs it on local look-alikes)",
    "get_peft_model(model, LoraConfig(r=16, lora_alpha=32": "a fragment on the reader's model (needs peft; "
    "tests/integrations/test_documented_routes.py runs it)",
    "FusedDPOTrainer(\n    model,": "a fragment on the reader's model and preference data (needs trl; "
    "tests/integrations/test_documented_routes.py runs it)",
    "trainer = Trainer.build(config, info)": "needs the tiny setup (runs/tiny): test_trainer_block_runs_as_written "
    "makes it and runs the block",
}
# Commands that never run here (GPU-only, hub-only, long benchmarks): prefix -> reason.
SKIPPED_COMMANDS = {
    "torchrun --nproc_per_node=8": "GPU-only: 8 GPUs and Llama-2-7B from the hub",
    "fastnpo cache-ref --config configs/tofu_llama2_7b": "GPU-only: Llama-2-7B from the hub",
    "fastnpo eval --model my-unlearned-llama": "hub-only: a hub model on locuslab/TOFU",
    "python benchmarks/": "benchmarks take minutes; benchmarks/test_bench_*.py run them at tiny shapes",
}
# What a checkout holds that is the user's, not the repository's (left out of the scratch root).
USER_STATE = {"runs", ".venv", ".venv-latest", ".git", ".pytest_cache", "build", "wheels"}
# Commands that take 15-60 s on 2 CPU cores: FASTNPO_DOCS_FULL=1 runs them.
LONG_COMMANDS = ("fastnpo train --config", "fastnpo eval")


def code_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced block."""
    pattern = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in pattern.finditer(text)]


def commands(block: str) -> list[str]:
    """Shell commands of a bash block: comments dropped, `\\` continuations joined."""
    lines = [line.split("  #")[0].split(" # ")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [" ".join(line.split()) for line in lines if line.strip()]


def skip_reason(block: str) -> str | None:
    return next((reason for key, reason in SKIPPED_BLOCKS.items() if key in block), None)


BLOCKS = [
    (path, line, lang, text) for path in DOCS for line, lang, text in code_blocks(path) if lang in ("bash", "python")
]


def test_every_block_is_classified():
    for path, line, lang, text in BLOCKS:
        if skip_reason(text):
            continue
        if lang == "python":
            assert "import fastnpo\n" in text, (
                f"{path.name}:{line}: unclassified python block: add it to SKIPPED_BLOCKS"
            )
        for command in commands(text) if lang == "bash" else []:
            known = command.startswith("fastnpo ") or any(command.startswith(p) for p in SKIPPED_COMMANDS)
            assert known, f"{path.name}:{line}: unclassified command {command!r}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_compile(path):
    for line, lang, text in code_blocks(path):
        if lang == "python":
            compile(text, f"{path.name}:{line}", "exec")


def test_public_api_block_runs():
    (block,) = [text for _, _, lang, text in BLOCKS if lang == "python" and "import fastnpo\n" in text]
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = -100  # the prompt
    context = {"hidden": torch.randn(2, 6, 8), "weight": torch.randn(11, 8), "labels": labels}
    context["ref_logps"] = torch.zeros(2)
    exec(block, context)
    # The block's two ways to the same per-sequence log-probs agree: token_logprobs does not shift.
    assert torch.allclose(context["logp"].sum(-1), context["seq"], atol=1e-5)


def _train_config(command: str):
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    return load_config(args.config, args.overrides)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
@pytest.mark.torchrun
def test_commands_run_as_written(path, tmp_path, monkeypatch, capsys):
    """In document order, in a scratch copy of the root: cheap commands run, trainer configs are
    loaded, the folders eval reads must have been written by an earlier command."""
    monkeypatch.chdir(tmp_path)
    # The repository root as a user's checkout has it (every top-level entry but their own runs/),
    # so that a command runs with the same folders on sys.path as it would from the root.
    for entry in REPO.iterdir():
        if entry.name not in USER_STATE:
            (tmp_path / entry.name).symlink_to(entry)
    outputs, written = {}, set()
    for line, lang, text in code_blocks(path):
        if lang != "bash" or skip_reason(text):
            continue
        for command in commands(text):
            where = f"{path.name}:{line}: {command}"
            if any(command.startswith(p) for p in SKIPPED_COMMANDS):
                continue
            args = shlex.split(command)
            verbs = cli.build_parser()._subparsers._group_actions[0].choices
            assert args[1] in verbs, f"{where}: `fastnpo {args[1]}` is not a fastnpo command"
            if args[1] in ("train", "cache-ref") and "--print-config" not in args:
                out = _train_config(command.replace(" cache-ref", " train")).run.output_dir
                assert out not in outputs, f"{where} writes {out}, which `{outputs.get(out)}` wrote before"
                outputs[out] = command
                written.add(f"{out}/final")
            if args[1] == "eval":
                model = args[args.index("--model") + 1]
                assert model in written, f"{where}: nothing before it in {path.name} creates {model}"
                if "--out" in args:
                    written.add(args[args.index("--out") + 1])
                stats = args[args.index("--retain-stats") + 1] if "--retain-stats" in args else None
                assert stats is None or stats in written, f"{where}: nothing before it writes {stats}"
            if command.startswith(LONG_COMMANDS) and not FULL:
                continue
            # As a user runs it: a new process, started in the root (`fastnpo` is `python -m fastnpo.cli`).
            done = subprocess.run(
                [sys.executable, "-m", "fastnpo.cli", *args[1:]], capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"{where} failed (rc {done.returncode}):\n{done.stderr[-3000:]}"


@pytest.mark.torchrun
def test_trainer_block_runs_as_written(tmp_path):
    """docs/trainer.md's Python block (the Trainer seam) in a new process, in a scratch copy of the
    root after `fastnpo prepare-tiny`, as a reader runs it: it steps and exports."""
    (block,) = [text for path, _, lang, text in BLOCKS if "Trainer.build(config, info)" in text]
    for entry in REPO.iterdir():
        if entry.name not in USER_STATE:
            (tmp_path / entry.name).symlink_to(entry)
    for command in (["-m", "fastnpo.cli", "prepare-tiny", "--out", "runs/tiny"], ["-c", block]):
        done = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split()[0] for line in done.stdout.splitlines() if line[:1].isdigit()]
    assert steps == ["1", "2"]
    assert (tmp_path / "runs" / "by_hand" / "final" / "model.safetensors").is_file()
