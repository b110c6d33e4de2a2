"""A `fastnpo` command prints fastnpo's lines only: no third-party import noise, no foreign progress bars."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastnpo.console import quiet_third_party

REPO = Path(__file__).resolve().parents[1]

# Every line `fastnpo prepare-tiny` and `fastnpo train` (tiny setup) print, as fastnpo writes them.
OURS = [
    r"\{.*\}",  # the command's one-line JSON summary
    r"reference log-probs[ :(].*",  # the reference pass: its bar, cache hit / written
    r"npo_rt: +\d+%\|.*",  # the training bar (named after the method)
    r"step \d+/\d+ epoch [\d.]+ .*",  # the step log
    r"exported runs/tiny_npo_rt/final",
]


def foreign_lines(output: str) -> list[str]:
    lines = [line.strip() for line in re.split(r"[\r\n]+", output)]
    return [line for line in lines if line and not any(re.fullmatch(p, line) for p in OURS)]


@pytest.mark.torchrun
def test_train_on_the_tiny_setup_prints_only_fastnpo_lines(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    printed = []
    for command in (["prepare-tiny", "--out", "runs/tiny"], ["train", "--config", str(REPO / "configs/tiny_cpu.yaml")]):
        done = subprocess.run(
            [sys.executable, "-m", "fastnpo.cli", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        printed.append(done.stdout + done.stderr)
    assert (tmp_path / "runs/tiny_npo_rt/final").is_dir()
    assert foreign_lines("\n".join(printed)) == []


def test_the_filters_drop_only_the_noise(caplog):
    """The known messages go; any other warning of the same loggers, and every error, still shows."""
    quiet_third_party()
    caplog.set_level(logging.WARNING)
    torchao = logging.getLogger("torchao")
    torchao.warning("Failed to load /site-packages/torchao/_C_mxfp8.so: Could not load this library")
    torchao.warning("a real torchao warning")
    torchao.error("a real torchao error")
    pytree = logging.getLogger("torch.utils._pytree")
    pytree.warning("<enum 'X'> is an Enum subclass and is now natively supported by torch.compile as an opaque value")
    pytree.warning("another pytree warning")
    assert [r.getMessage() for r in caplog.records] == [
        "a real torchao warning",
        "a real torchao error",
        "another pytree warning",
    ]


def test_download_bars_stay_and_transformers_bars_go():
    """A multi-GB download keeps huggingface_hub's bar; transformers' per-file bars go."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    quiet_third_party()
    assert not are_progress_bars_disabled() and not transformers_logging.is_progress_bar_enabled()


def test_a_demo_leaves_the_bars_as_it_found_them():
    """library_bars_off (the demos) restores every switch it turned, huggingface_hub's download bars
    included (transformers' switch turns them off too: after a demo in the same process they stayed
    off, and the test above failed when a demo test ran before it)."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    from fastnpo.console import library_bars_off

    quiet_third_party()
    before = (datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    with library_bars_off():
        assert are_progress_bars_disabled() and not datasets.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()
    assert (datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()) == before


def test_foreign_lines_catches_what_it_must():
    noise = (
        "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library\n"
        "Generating train split: 40 examples [00:00, 9936.17 examples/s]\r"
        "Loading weights: 100%|██████████| 21/21\n"
        "step 1/20 epoch 0.20 loss=1\n"
    )
    assert foreign_lines(noise) == [
        "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
        "Generating train split: 40 examples [00:00, 9936.17 examples/s]",
        "Loading weights: 100%|██████████| 21/21",
    ]


@pytest.mark.torchrun
def test_the_hugging_face_route_warns_about_nothing_of_ours(tmp_path):
    """Importing the integration and a patched model's forward raise no warning of fastnpo's making
    (a class decorated with no_grad; reading the outputs' cache under its pre-5.25 name)."""
    code = """
import logging, warnings
warnings.simplefilter("error")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import fastnpo.integrations.hf as hf
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=61))
hf.patch_model(model, impl="torch")
ids = torch.randint(0, 61, (2, 7))
out = model(input_ids=ids, labels=ids)
out.loss.backward()
print("ok", out.logits is None)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "True"]
    assert "past_key_values" not in done.stderr, done.stderr  # transformers' logger, not a warning
