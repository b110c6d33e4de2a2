"""TOFU evaluation against a naive Hugging Face computation, and the demo end to end at toy size."""

import json
import math
from pathlib import Path

import pytest
import torch

from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu.evaluate import EvalConfig, Evaluator, add_forget_quality, summary
from fastnpo.tofu.minitofu import prepare_tiny

pytestmark = pytest.mark.end_to_end  # whole runs in process: `make test` runs them, the inner loop skips them

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = prepare_tiny(
        tmp_path_factory.mktemp("eval"),
        num_authors=10,
        qa_per_author=2,
        spec=TinyModelSpec(hidden_size=32, intermediate_size=64),
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    evaluator = Evaluator(
        EvalConfig(data=str(paths["data"]), forget_split="forget10", max_new_tokens=6, batch_size=5),
        tokenizer,
    )
    return paths, tokenizer, model, evaluator


def naive_mean_logprob(model, tokenizer, question, answer):
    prompt = [tokenizer.bos_token_id, *tokenizer(f"[INST] {question} [/INST]")["input_ids"]]
    reply = [*tokenizer(" " + answer)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(reply)[:, None]).mean().item()


def test_report_matches_naive_computation(setup):
    paths, tokenizer, model, evaluator = setup
    report = evaluator.evaluate(model)
    rows = [
        json.loads(line) for line in (paths["data"] / "forget10_perturbed.jsonl").read_text().splitlines()
    ]
    probabilities = [math.exp(naive_mean_logprob(model, tokenizer, r["question"], r["answer"])) for r in rows]
    assert report["forget"]["probability"] == pytest.approx(sum(probabilities) / len(rows), rel=1e-4)
    first = rows[0]
    para = naive_mean_logprob(model, tokenizer, first["question"], first["paraphrased_answer"])
    pert = [naive_mean_logprob(model, tokenizer, first["question"], a) for a in first["perturbed_answer"]]
    assert report["forget"]["truth_ratios"][0] == pytest.approx(
        math.exp(sum(pert) / len(pert) - para), rel=1e-4
    )

    world = [
        json.loads(line) for line in (paths["data"] / "world_facts_perturbed.jsonl").read_text().splitlines()
    ]
    normalised = []
    for r in world:
        true = math.exp(naive_mean_logprob(model, tokenizer, r["question"], r["answer"]))
        wrong = sum(
            math.exp(naive_mean_logprob(model, tokenizer, r["question"], a)) for a in r["perturbed_answer"]
        )
        normalised.append(true / (true + wrong))
    assert report["world_facts"]["probability"] == pytest.approx(sum(normalised) / len(world), rel=1e-4)
    for key in ("forget/rouge", "retain/truth_ratio", "real_authors/probability"):
        assert 0 <= summary(report)[key] <= 1
    assert 0 <= report["model_utility"] <= 1


def test_batched_generation_equals_one_by_one(setup):
    _, tokenizer, model, evaluator = setup
    prompts = evaluator.sets["retain"]["prompts"][:7]
    batched = evaluator.generate(model, prompts)
    for prompt, text in zip(prompts, batched, strict=True):
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        assert tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip() == text


def test_forget_quality_of_a_model_against_itself_is_one(setup):
    _, _, model, evaluator = setup
    report = evaluator.evaluate(model)
    assert add_forget_quality(report, report)["forget_quality"] == pytest.approx(1.0)
    other = {"forget": {"truth_ratios": report["forget"]["truth_ratios"][:-1]}}
    with pytest.raises(ValueError, match="same forget split"):
        add_forget_quality(report, other)


def test_missing_columns_and_data_are_reported(tmp_path, setup):
    _, tokenizer, _, _ = setup
    with pytest.raises(ValueError, match=r"EvalConfig\.data is required"):
        Evaluator(EvalConfig(), tokenizer)
    for split in (
        "forget10_perturbed",
        "retain_perturbed",
        "real_authors_perturbed",
        "world_facts_perturbed",
    ):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="paraphrased_answer"):
        Evaluator(EvalConfig(data=str(tmp_path)), tokenizer)


@pytest.mark.torchrun
def test_demo_end_to_end_at_toy_size(tmp_path):
    from fastnpo.tofu.demo import PRESETS, run_demo

    results = run_demo(tmp_path / "demo", "quick", log=lambda message: None)
    for name in ("results.json", "results.md", "forget_quality_vs_utility.png", "memorisation.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    preset = PRESETS["quick"]
    assert saved["unlearn_seeds"] == list(preset.unlearn_seeds) and len(preset.unlearn_seeds) >= 2
    for seed in preset.unlearn_seeds:
        for split in preset.splits:
            for method in preset.methods:
                epochs = saved["runs"][str(seed)][split][method]
                assert [e["epoch"] for e in epochs] == list(range(int(preset.unlearn_epochs) + 1))
                assert all(0 <= e["forget_quality"] <= 1 and 0 <= e["model_utility"] <= 1 for e in epochs)
    assert results["retain_models"][preset.splits[0]]["forget_quality"] == pytest.approx(1.0)
    # What the numbers depend on is recorded (issue 14 item 1).
    env = saved["environment"]
    for package in ("python", "torch", "transformers", "tokenizers", "datasets", "numpy"):
        assert env["versions"][package], package
    assert env["torch_threads"] == preset.threads and env["blas"] and "git_commit" in env
    assert saved["preset"] == "quick" and saved["seed"] == 0
    # privleak against the split's own retain model (issue 27 item 3): 0 for that model itself; every
    # row of the table has it and extraction strength.
    for split in preset.splits:
        assert saved["retain_models"][split]["privleak"] == 0.0
        finals = [saved["target"][split]] + [
            saved["runs"][str(seed)][split][method][-1] for seed in preset.unlearn_seeds for method in preset.methods
        ]
        for entry in finals:
            assert isinstance(entry["privleak"], float) and 0 <= entry["extraction_strength"] <= 1
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| final privleak | final ES |" in table and "n/a" not in table
    # The committed quick table is what this code produces: published numbers cannot drift from
    # the code. Regenerate with the command in docs/demo/README.md when a change is intended.
    committed = (REPO / "docs" / "demo" / "quick" / "results.md").read_text()
    assert (tmp_path / "demo" / "results.md").read_text() == committed


def test_demo_runs_the_methods_beyond_the_default_six_at_toy_size(tmp_path):
    from fastnpo.tofu.demo import DEFAULT_METHODS, PRESETS, UNLEARNING_METHODS, run_demo
    from fastnpo.tofu.plots import METHOD_LABELS

    others = tuple(m for m in UNLEARNING_METHODS if m not in DEFAULT_METHODS)
    assert set(others) == {"npo_kl", "wga", "satimp", "ceu", "rmu", "undial", "pdu"}
    assert PRESETS["full"].methods == UNLEARNING_METHODS
    # AltPO needs alternate answers, which Mini-TOFU does not hold: the one method the demo leaves out
    assert [m for m in METHOD_LABELS if m not in UNLEARNING_METHODS] == ["altpo"]
    run_demo(tmp_path / "demo", "quick", log=lambda message: None, unlearn_seeds=[0], methods=others)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    runs = saved["runs"]["0"]["forget10"]
    assert list(runs) == list(others)
    for method, epochs in runs.items():
        assert [e["epoch"] for e in epochs] == list(range(int(PRESETS["quick"].unlearn_epochs) + 1)), method
        assert epochs[-1]["model_utility"] != epochs[0]["model_utility"], f"{method} did not change the model"
    table = (tmp_path / "demo" / "results.md").read_text()
    assert all(f"| {METHOD_LABELS[m]} |" in table for m in others)
    with pytest.raises(ValueError, match=r"methods must be a non-empty list of .*got \['npo', 'nope'\]"):
        run_demo(tmp_path / "bad", "quick", methods=["npo", "nope"])
    assert not (tmp_path / "bad").exists()


def test_published_demo_table_is_the_table_of_the_published_results():
    from fastnpo.tofu.plots import results_table

    published = json.loads((REPO / "docs" / "demo" / "results.json").read_text())
    assert (REPO / "docs" / "demo" / "results.md").read_text() == results_table(published) + "\n"
    assert published["preset"] == "default" and len(published["unlearn_seeds"]) >= 3


def test_eval_command_reports_privleak_and_extraction_strength(setup, tmp_path, capsys):
    from fastnpo import cli

    paths, _, _, _ = setup
    base = ["eval", "--model", str(paths["base"]), "--data", str(paths["data"]), "--no-plot"]
    out = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="default retain AUC of 0.5"):
        assert cli.main([*base, "--out", str(out), "--attacks", "mia_loss,mia_min_k_plus_plus"]) == 0
    report = json.loads(out.read_text())
    flat = summary(report)
    for key in ("privleak", "extraction_strength", "exact_memorization", "mia_min_k", "mia_loss"):
        assert isinstance(flat[key], float), key
    assert "mia_min_k_plus_plus" in report["privacy"] and "mia_gradnorm" not in report["privacy"]
    assert report["privacy"]["holdout_split"] == "holdout10" and report["privacy"]["retain_auc"] is None
    assert '"privleak"' in capsys.readouterr().out
    # The model as its own retain model and reference: privleak 0, every reference score 0.
    again = tmp_path / "again.json"
    argv = [*base, "--out", str(again), "--retain-stats", str(out), "--reference-stats", str(out)]
    assert cli.main([*argv, "--attacks", "mia_reference"]) == 0
    section = json.loads(again.read_text())["privacy"]
    assert section["privleak"] == pytest.approx(0.0) and section["mia_reference"]["auc"] == 0.5
    # Flag errors, before any evaluation.
    assert cli.main([*base, "--attacks", "mia_recall"]) == 2
    assert cli.main([*base, "--attacks", "mia_reference"]) == 2
    assert cli.main([*base, "--no-privacy", "--attacks", "all"]) == 2
    err = capsys.readouterr().err
    assert "mia_recall" in err and "--reference-stats" in err and "--no-privacy" in err
