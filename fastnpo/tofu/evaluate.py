"""TOFU evaluation of a causal LM: probability, truth ratio, ROUGE-L, forget quality, model utility.

The four TOFU evaluation sets are loaded and tokenised once (`Evaluator`), then every model
is scored on them in batches: answer log-probs through the fused op (no full logits),
greedy generations for ROUGE-L. The metric formulas live in metrics.py. Forget quality needs
a retain model's truth ratios on the same forget questions: evaluate the retain model once,
save its JSON, and pass it to every later evaluation.

Evaluation runs on one process (rank 0 of a torchrun job does it alone; see cli.py).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data import DataConfig, collate, encode_prompt, load_qa_split, tokenize_split
from ..modeling import SequenceLogprobModel, greedy_generate, load_causal_lm, load_tokenizer
from ..train.evaluation import EpochEvaluator
from . import metrics

SETS = ("forget", "retain", "real_authors", "world_facts")
# The answer each set's truth ratio compares the perturbed answers with (TOFU eval_everything.yaml
# base_answer_key; open-unlearning ra_/wf_Truth_Ratio). TOFU's real-authors and world-facts files
# have no paraphrased_answer column.
BASE_ANSWER = {
    "forget": "paraphrased_answer",
    "retain": "paraphrased_answer",
    "real_authors": "answer",
    "world_facts": "answer",
}


@dataclass
class EvalConfig:
    """data: a folder of TOFU-schema files (<split>.jsonl) or a hub name ("locuslab/TOFU").
    The forget set evaluated is <forget_split>_perturbed. Sets are capped at max_examples
    (TOFU: 300)."""

    data: str = ""
    forget_split: str = "forget10"
    retain_split: str = "retain_perturbed"
    real_authors_split: str = "real_authors_perturbed"
    world_facts_split: str = "world_facts_perturbed"
    template: str = "[INST] {question} [/INST]"
    answer_prefix: str = " "
    max_length: int = 256
    batch_size: int = 64
    max_examples: int = 300
    max_new_tokens: int = 48
    generate: bool = True
    impl: str = "auto"


class Evaluator:
    """Loads and tokenises the evaluation sets once; `evaluate(model)` scores one model."""

    def __init__(self, config: EvalConfig, tokenizer):
        if not config.data:
            raise ValueError("EvalConfig.data is required: a folder of TOFU-schema files or a hub dataset name")
        self.config, self.tokenizer = config, tokenizer
        self.data_config = DataConfig(
            forget=config.data,
            template=config.template,
            answer_prefix=config.answer_prefix,
            max_length=config.max_length,
        )
        splits = {
            "forget": f"{config.forget_split}_perturbed",
            "retain": config.retain_split,
            "real_authors": config.real_authors_split,
            "world_facts": config.world_facts_split,
        }
        self.sets = {}
        for name, split in splits.items():
            rows = load_qa_split(config.data, split, what=f"{name} evaluation set")
            rows = rows.select(range(min(len(rows), config.max_examples)))
            for column in (BASE_ANSWER[name], "perturbed_answer"):
                if column not in rows.column_names:
                    raise ValueError(f"{name} evaluation set ({split}) has no {column!r} column")
            self.sets[name] = self._tokenise(rows, BASE_ANSWER[name])

    def _tokenise(self, rows, base_column: str) -> dict:
        questions = rows["question"]
        perturbed = rows["perturbed_answer"]
        width = min(len(p) for p in perturbed)
        if width == 0:
            raise ValueError("every example needs at least one perturbed_answer")

        def encode(answers, repeat=1):
            table = datasets.Dataset.from_dict(
                {"question": [q for q in questions for _ in range(repeat)], "answer": answers}
            )
            return tokenize_split(table, self.tokenizer, self.data_config).items

        true = encode(rows["answer"])
        return {
            "questions": questions,
            "answers": rows["answer"],
            "true": true,
            "base": true if base_column == "answer" else encode(rows[base_column]),
            # A fixed number per example (the smallest present): a rectangular [n, k] table.
            "perturbed": encode([a for p in perturbed for a in p[:width]], repeat=width),
            "width": width,
            "prompts": [encode_prompt(self.tokenizer, q, template=self.config.template) for q in questions],
        }

    @torch.no_grad()
    def mean_logprobs(self, model: SequenceLogprobModel, items: list[dict]) -> np.ndarray:
        """Token-mean answer log-prob of each item."""
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(items), self.config.batch_size):
            batch = collate(items[start : start + self.config.batch_size], self.tokenizer.pad_token_id)
            logps, counts, _ = model({k: v.to(device) for k, v in batch.items()})
            out.append((logps.float() / counts.clamp(min=1)).cpu())
        return torch.cat(out).double().numpy()

    def generate(self, lm, prompts: list[list[int]]) -> list[str]:
        """Greedy answers, batched with left padding."""
        return greedy_generate(
            lm, self.tokenizer, prompts, max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size
        )

    def evaluate(self, lm) -> dict:
        """Per-set statistics and model utility of a Hugging Face causal LM."""
        was_training = lm.training
        lm.eval()
        wrapper = SequenceLogprobModel(lm, impl=self.config.impl)
        report = {}
        for name, tokenised in self.sets.items():
            true = self.mean_logprobs(wrapper, tokenised["true"])
            base = true if tokenised["base"] is tokenised["true"] else self.mean_logprobs(wrapper, tokenised["base"])
            pert = self.mean_logprobs(wrapper, tokenised["perturbed"]).reshape(len(true), tokenised["width"])
            ratios = metrics.truth_ratio(base, pert)
            if name in ("real_authors", "world_facts"):
                probability = metrics.normalized_probability(true, pert)
            else:
                probability = metrics.probability(true)
            stats = {
                "probability": float(np.mean(probability)),
                # What the benchmark reports under this name: min(R, 1/R) on the forget set,
                # max(0, 1 - R) on the sets that enter model utility.
                "truth_ratio": (
                    metrics.forget_truth_ratio_score(ratios) if name == "forget" else metrics.truth_ratio_score(ratios)
                ),
                "mean_truth_ratio": float(np.mean(ratios)),
                "truth_ratios": ratios.tolist(),
            }
            if self.config.generate:
                answers = self.generate(lm, tokenised["prompts"])
                stats["rouge"] = float(np.mean(metrics.rouge_l_recall(answers, tokenised["answers"])))
                stats["generations"] = answers
            report[name] = stats
        if self.config.generate:
            report["model_utility"] = metrics.model_utility(
                {f"{s}/{m}": report[s][m] for s in metrics.MODEL_UTILITY_SPLITS for m in metrics.MODEL_UTILITY_METRICS}
            )
        lm.train(was_training)
        return report


def add_forget_quality(report: dict, retain_report: dict) -> dict:
    """forget_quality: KS-test p-value of the forget-set truth ratios against the retain model's."""
    ours, theirs = report["forget"]["truth_ratios"], retain_report["forget"]["truth_ratios"]
    if len(ours) != len(theirs):
        raise ValueError(
            f"the retain statistics cover {len(theirs)} forget questions, this evaluation {len(ours)}: "
            "evaluate both on the same forget split"
        )
    report["forget_quality"] = metrics.forget_quality(ours, theirs)
    return report


def summary(report: dict) -> dict:
    """The headline numbers, without per-example lists."""
    out = {k: report[k] for k in ("forget_quality", "model_utility") if k in report}
    for name in SETS:
        out.update({f"{name}/{k}": v for k, v in report[name].items() if isinstance(v, float)})
    return out


def epoch_evaluator(config, tokenizer) -> EpochEvaluator:
    """The trainer's per-epoch TOFU evaluation (run.eval_every_epoch, run.keep_best): the run's
    eval keys into an Evaluator, forget quality against run.retain_stats, a flat summary."""
    r = config.run
    eval_config = EvalConfig(
        data=r.eval_data,
        forget_split=r.eval_forget_split,
        template=config.data.template,
        answer_prefix=config.data.answer_prefix,
        max_examples=r.eval_max_examples,
        max_new_tokens=r.eval_max_new_tokens,
        generate=r.eval_generate,
        impl=config.model.impl,
    )
    evaluator = Evaluator(eval_config, tokenizer)
    retain = json.loads(Path(r.retain_stats).read_text()) if r.retain_stats else None
    per_set = ["probability", "truth_ratio", "mean_truth_ratio"] + (["rouge"] if r.eval_generate else [])
    metrics = [f"{s}/{m}" for s in evaluator.sets for m in per_set]
    metrics += ["model_utility"] if r.eval_generate else []
    metrics += ["forget_quality"] if retain is not None else []

    def evaluate(model):
        report = evaluator.evaluate(model)
        return summary(add_forget_quality(report, retain) if retain is not None else report)

    notes = {
        "forget_quality": "needs run.retain_stats (a `fastnpo eval --out` JSON of the retain model)",
        "model_utility": "needs run.eval_generate=true",
    }
    return EpochEvaluator(evaluate, tuple(metrics), notes)


def evaluate_path(
    model_path: str | Path, config: EvalConfig, retain_report: dict | None = None, device: str = "auto"
) -> dict:
    """`fastnpo eval`: load a model folder (or hub name) and its tokenizer, evaluate it."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tokenizer = load_tokenizer(str(model_path))
    lm = load_causal_lm(str(model_path), dtype="auto").to(device)
    report = Evaluator(config, tokenizer).evaluate(lm)
    if retain_report is not None:
        add_forget_quality(report, retain_report)
    return report
