"""The TOFU numbers as the benchmark defines them (TOFU eval_everything.yaml and
aggregate_eval_stat.py, open-unlearning's tofu_metrics), on files laid out as locuslab/TOFU ships them."""

import json
import math

import numpy as np
import pytest
import torch

from fastnpo.methods import MethodConfig, loss_terms
from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu import metrics
from fastnpo.tofu.evaluate import EvalConfig, Evaluator
from fastnpo.tofu.minitofu import prepare_tiny

# The columns of each locuslab/TOFU split used by the evaluation, exactly as on the hub.
HUB_COLUMNS = {
    "forget10_perturbed": ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"),
    "retain_perturbed": ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"),
    "real_authors_perturbed": ("question", "answer", "perturbed_answer"),
    "world_facts_perturbed": ("question", "answer", "perturbed_answer"),
}


def test_forget_truth_ratio_is_mean_of_min_r_and_its_inverse():
    assert metrics.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)
    assert metrics.forget_truth_ratio_score([4.0]) == pytest.approx(0.25)
    assert metrics.forget_truth_ratio_score([0.0, math.inf]) == 0.0
    # Not the model-utility score, which is one-sided.
    assert metrics.truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(0.5 / 3)


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tofu_layout")
    spec = TinyModelSpec(hidden_size=32, intermediate_size=64)
    paths = prepare_tiny(root, num_authors=10, qa_per_author=2, spec=spec)
    hub = root / "hub"
    hub.mkdir()
    for split, columns in HUB_COLUMNS.items():
        rows = [json.loads(line) for line in (paths["data"] / f"{split}.jsonl").read_text().splitlines()]
        assert all(set(columns) <= set(row) for row in rows), split
        (hub / f"{split}.jsonl").write_text("".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    return hub, tokenizer, model


def naive_mean_logprobs(model, tokenizer, question, answers):
    prompt = [tokenizer.bos_token_id, *tokenizer(f"[INST] {question} [/INST]", add_special_tokens=False)["input_ids"]]
    out = []
    for answer in answers:
        reply = [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].double()
        out.append(logits.log_softmax(-1).gather(1, torch.tensor(reply)[:, None]).mean().item())
    return np.array(out)


def test_hub_layout_evaluates_with_the_benchmark_base_answers(hub_layout):
    hub, tokenizer, model = hub_layout
    config = EvalConfig(data=str(hub), forget_split="forget10", generate=False, batch_size=7)
    report = Evaluator(config, tokenizer).evaluate(model)  # refused before: no paraphrased_answer
    for name, split, base in (
        ("real_authors", "real_authors_perturbed", "answer"),
        ("world_facts", "world_facts_perturbed", "answer"),
        ("retain", "retain_perturbed", "paraphrased_answer"),
        ("forget", "forget10_perturbed", "paraphrased_answer"),
    ):
        row = json.loads((hub / f"{split}.jsonl").read_text().splitlines()[0])
        logps = naive_mean_logprobs(model, tokenizer, row["question"], [row[base], *row["perturbed_answer"]])
        lines = (hub / f"{split}.jsonl").read_text().splitlines()
        width = min(len(json.loads(line)["perturbed_answer"]) for line in lines)
        expected = math.exp(np.mean(logps[1 : 1 + width]) - logps[0])
        assert report[name]["truth_ratios"][0] == pytest.approx(expected, rel=1e-4), name
    ratios = np.array(report["forget"]["truth_ratios"])
    assert report["forget"]["truth_ratio"] == pytest.approx(np.mean(np.minimum(ratios, 1 / ratios)))
    retain = np.array(report["retain"]["truth_ratios"])
    assert report["retain"]["truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - retain)))


def test_simnpo_delta_is_gamma_over_beta():
    logps, counts = {"forget": torch.tensor([-12.0, -30.0]), "retain": torch.tensor([-5.0])}, None
    counts = {"forget": torch.tensor([4, 10]), "retain": torch.tensor([3])}
    by_gamma = loss_terms(MethodConfig(name="simnpo", beta=2.5, simnpo_gamma=0.5), logps, counts, {})
    by_delta = loss_terms(MethodConfig(name="simnpo", beta=2.5, delta=0.2), logps, counts, {})
    torch.testing.assert_close(by_delta["simnpo"].value, by_gamma["simnpo"].value)
    # open-unlearning's form: -(2/beta) logsigmoid(beta (NLL/|y| - delta))
    nll = torch.tensor([12.0 / 4, 30.0 / 10])
    expected = (-(2 / 2.5) * torch.nn.functional.logsigmoid(2.5 * (nll - 0.2))).mean()
    torch.testing.assert_close(by_delta["simnpo"].value, expected)
    with pytest.raises(ValueError, match=r"method\.delta"):
        MethodConfig(name="simnpo", simnpo_gamma=0.5, delta=0.2)
