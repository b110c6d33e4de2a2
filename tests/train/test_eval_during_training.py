"""Per-epoch evaluation during training and the best epoch kept (eval.every_epoch,
eval.keep_best), in one process and with 2 gloo ranks under torchrun.

The trainer takes the evaluator from its caller (fastnpo.train may not import fastnpo.tofu);
`fastnpo.tofu.evaluate.epoch_evaluator` is the TOFU one; the CLI passes it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu.evaluate import EvalConfig, Evaluator, epoch_evaluator
from fastnpo.tofu.minitofu import prepare_tiny
from fastnpo.train import train
from fastnpo.train.config import ConfigError, load_config
from fastnpo.train.evaluation import EpochEvaluator

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3


def tofu_epoch_evaluator(config, tokenizer) -> EpochEvaluator:
    """fastnpo.tofu.evaluate.epoch_evaluator, counting its calls (and the rank) in a file."""
    inner = epoch_evaluator(config, tokenizer)
    calls = os.environ.get("FASTNPO_TEST_EVAL_CALLS")

    def evaluate(model):
        if calls:
            with open(calls, "a") as f:
                f.write(f"{os.environ.get('RANK', '0')}\n")
        return inner.evaluate(model)

    return EpochEvaluator(evaluate, inner.metrics, inner.notes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    setup = prepare_tiny(
        root, num_authors=20, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64)
    )
    # The "retain model" statistics forget quality compares with: here the base model's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    lm = AutoModelForCausalLM.from_pretrained(setup["base"])
    report = Evaluator(EvalConfig(data=str(setup["data"]), **QUICK), tokenizer).evaluate(lm)
    stats = root / "retain_stats.json"
    stats.write_text(json.dumps(report))
    return {**setup, "retain_stats": stats}


QUICK = {"max_examples": 6, "max_new_tokens": 3}


def overrides(tiny, out, **extra):
    values = {
        "model.name_or_path": tiny["base"],
        "data.forget": tiny["data"],
        "data.retain": tiny["data"],
        "data.batch_size": 2,
        "data.retain_batch_size": 2,
        "data.max_length": 64,
        "method.name": "npo_rt",
        "run.output_dir": out,
        "run.progress": False,
        "run.checkpoint_every": 0,
        "optim.lr": 1e-2,
        "optim.epochs": EPOCHS,
        "optim.max_steps": 0,
        "eval.every_epoch": True,
        "eval.data": tiny["data"],
        "eval.forget_split": "forget10",
        "eval.retain_stats": tiny["retain_stats"],
        "eval.max_examples": QUICK["max_examples"],
        "eval.max_new_tokens": QUICK["max_new_tokens"],
        # On the random tiny model ROUGE (hence model utility) is 0 and forget quality one value
        # every epoch; the real-authors probability peaks mid-run, so best/ is not final/.
        "eval.keep_best": "real_authors/probability",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items() if v is not None]  # None: the key's default


def config_for(tiny, out, **extra):
    return load_config(REPO / "configs" / "tiny_cpu.yaml", overrides(tiny, out, **extra))


def evaluate_folder(path, config) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tofu_epoch_evaluator(config, tokenizer).evaluate(AutoModelForCausalLM.from_pretrained(path))


def check_run(out: Path, config, metric: str) -> dict:
    """epochs.jsonl: one line per epoch; best.json names the best of them; best/ is that model."""
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    values = [e[metric] for e in epochs]
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == metric
    assert best["epoch"] == 1 + values.index(max(values))  # the first of equal maxima
    assert best["value"] == pytest.approx(max(values))
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "config.json").exists()
    again = evaluate_folder(out / "best", config)
    chosen = epochs[best["epoch"] - 1]
    for key in ("forget/probability", "retain/probability", "forget_quality", "model_utility", metric):
        assert again[key] == pytest.approx(chosen[key], rel=1e-4, abs=1e-6), key
    return best


# ----------------------------------------------------------------------------- one process


def test_one_process_evaluates_each_epoch_and_keeps_the_best(tiny, tmp_path):
    out = tmp_path / "run"
    config = config_for(tiny, out)
    result = train(config, evaluator=tofu_epoch_evaluator)
    assert len(result["epochs"]) == EPOCHS
    best = check_run(out, config, "real_authors/probability")
    assert result["best"]["epoch"] == best["epoch"]
    for epoch in result["epochs"]:
        assert 0 <= epoch["forget_quality"] <= 1
    final = load_file(out / "final" / "model.safetensors")
    kept = load_file(out / "best" / "model.safetensors")
    same = all(torch.equal(final[k], kept[k]) for k in final)
    assert same == (best["epoch"] == EPOCHS)


def test_min_mode_keeps_the_lowest_forget_probability(tiny, tmp_path):
    out = tmp_path / "run"
    extra = {"eval.keep_best": "forget/probability", "eval.keep_best_mode": "min", "eval.generate": False}
    config = config_for(tiny, out, **extra)
    train(config, evaluator=tofu_epoch_evaluator)
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    values = [e["forget/probability"] for e in epochs]
    assert "model_utility" not in epochs[0]
    best = json.loads((out / "best.json").read_text())
    assert best["epoch"] == 1 + values.index(min(values))
    again = evaluate_folder(out / "best", config)
    assert again["forget/probability"] == pytest.approx(min(values), rel=1e-4)


def test_without_the_keys_nothing_changes(tiny, tmp_path):
    # The same run without evaluation: bit-identical final weights, no epochs.jsonl or best/.
    plain = {"eval.every_epoch": False, "eval.keep_best": None}
    train(config_for(tiny, tmp_path / "plain", **plain))
    train(config_for(tiny, tmp_path / "evaluated"), evaluator=tofu_epoch_evaluator)
    assert not (tmp_path / "plain" / "epochs.jsonl").exists()
    assert not (tmp_path / "plain" / "best").exists()
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "evaluated" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluating must not change the training trajectory"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"eval.every_epoch": False}, "eval.keep_best"),  # keep_best without evaluation
        ({"eval.keep_best_mode": "highest"}, "eval.keep_best_mode"),
        ({"eval.data": None}, "eval.data"),
        ({"eval.retain_stats": "/nonexistent/stats.json"}, "eval.retain_stats"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tiny, tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_for(tiny, tmp_path / "run", **extra)


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"eval.keep_best": "no_such_metric"}, "eval.keep_best", "unknown metric"),
        ({"eval.keep_best": "forget_quality", "eval.retain_stats": None}, "eval.keep_best", "needs eval.retain_stats"),
        ({"eval.data": "/nonexistent/tofu"}, "eval.data", "could not be set up"),
    ],
)
def test_bad_evaluation_is_refused_before_any_work(tiny, tmp_path, extra, key, words):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        train(config_for(tiny, out, **extra), evaluator=tofu_epoch_evaluator)
    assert words in str(error.value)
    assert not (out / "run_info.json").exists() and not (out / "metrics.jsonl").exists()


def test_eval_every_epoch_needs_an_evaluator(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.every_epoch"):
        train(config_for(tiny, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- torchrun

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_eval_during_training import tofu_epoch_evaluator
from fastnpo.train import load_config, train
train(load_config(sys.argv[1], sys.argv[2:]), evaluator=tofu_epoch_evaluator)
"""


@pytest.mark.torchrun
def test_two_ranks_evaluate_once_per_epoch_and_keep_the_best(tiny, tmp_path):
    out = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).resolve().parent)))
    calls = tmp_path / "eval_calls.txt"
    config_file = REPO / "configs" / "tiny_cpu.yaml"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(driver), str(config_file)]
    process = subprocess.run(
        [*args, *overrides(tiny, out, **{"data.batch_size": 1, "data.retain_batch_size": 1})],
        cwd=REPO,
        env={**os.environ, "FASTNPO_TEST_EVAL_CALLS": str(calls)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    assert process.returncode == 0, process.stdout
    assert json.loads((out / "run_info.json").read_text())["fsdp"] is True
    assert calls.read_text().split() == ["0"] * EPOCHS, "evaluated once per epoch, on rank 0"
    config = config_for(tiny, out, **{"data.batch_size": 1, "data.retain_batch_size": 1})
    check_run(out, config, "real_authors/probability")


@pytest.mark.torchrun
def test_cli_evaluates_each_epoch_and_keeps_the_best(tiny, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "fastnpo.cli", "train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    done = subprocess.run(command + overrides(tiny, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((out / "epochs.jsonl").read_text().splitlines()) == EPOCHS
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "real_authors/probability" and (out / "best" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- resume


def test_a_resumed_run_keeps_the_best_epoch_it_had_reached(tiny, tmp_path):
    """Stopped in the last epoch's evaluation (after epochs 1-2 chose a best), resumed from the
    newest checkpoint: the same best.json, best/ and final/ as a run that never stopped."""

    class Stop(RuntimeError):
        pass

    def stops_at_the_last_epoch(config, tokenizer) -> EpochEvaluator:
        inner, calls = tofu_epoch_evaluator(config, tokenizer), []

        def evaluate(model):
            calls.append(1)
            if len(calls) == EPOCHS:
                raise Stop("stopped in the last epoch's evaluation")
            return inner.evaluate(model)

        return EpochEvaluator(evaluate, inner.metrics, inner.notes)

    every_step = {"run.checkpoint_every": 1}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config_for(tiny, straight, **every_step), evaluator=tofu_epoch_evaluator)
    # the best is an epoch before the last: the resumed run must carry it over, not re-find it
    assert json.loads((straight / "best.json").read_text())["epoch"] < EPOCHS
    with pytest.raises(Stop):
        train(config_for(tiny, stopped, **every_step), evaluator=stops_at_the_last_epoch)
    assert json.loads((stopped / "best.json").read_text())["epoch"] < EPOCHS and not (stopped / "final").exists()
    result = train(config_for(tiny, stopped, **every_step), evaluator=tofu_epoch_evaluator)
    assert result["steps"] == json.loads((straight / "run_info.json").read_text())["total_steps"]
    assert json.loads((stopped / "best.json").read_text()) == json.loads((straight / "best.json").read_text())
    for folder in ("best", "final"):
        a, b = load_file(straight / folder / "model.safetensors"), load_file(stopped / folder / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), folder
