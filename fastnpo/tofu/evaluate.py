"""TOFU evaluation of a causal LM: probability, truth ratio, ROUGE-L, forget quality, model utility;
and, as open-unlearning's default TOFU evaluation adds them, privleak and extraction strength (with
exact memorization and, on request, the membership-inference attacks: attacks.py, privacy.py).

The four TOFU evaluation sets are loaded and tokenised once (`Evaluator`), then every model
is scored on them in batches: answer log-probs through the fused op (no full logits),
greedy generations for ROUGE-L. The metric formulas live in metrics.py. Forget quality needs
a retain model's truth ratios on the same forget questions: evaluate the retain model once,
save its JSON, and pass it to every later evaluation.

Privleak needs the holdout split (holdout01/05/10 beside forget01/05/10) and the retain model's
report for its AUC (0.5 with a warning without it), as forget quality does.

Evaluation runs on one process (rank 0 of a torchrun job does it alone; see cli.py).
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data import DataConfig, collate, encode_prompt, load_qa_split, tokenize_split
from ..modeling import SequenceLogprobModel, greedy_generate, load_causal_lm, load_tokenizer
from ..train.evaluation import EpochEvaluator
from . import attacks, metrics
from .privacy import ATTACKS, MIN_K, PRIVLEAK_ATTACK

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
    (TOFU: 300).

    privacy: privleak, extraction strength and exact memorization (open-unlearning's default TOFU
    evaluation reports the first two). The holdout set is holdout_split, by default the forget
    split's ("forget10" -> "holdout10"); a default one that is missing is skipped with a warning
    (no privleak then). attacks: membership-inference attacks to add (ATTACKS: mia_loss,
    mia_zlib, mia_min_k, mia_min_k_plus_plus, mia_reference, mia_gradnorm), k: Min-K% / Min-K%++'s
    fraction, gradnorm_p: mia_gradnorm's norm."""

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
    privacy: bool = True
    holdout_split: str = ""
    attacks: tuple[str, ...] = ()
    k: float = MIN_K
    gradnorm_p: float = 2.0


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
        self.holdout = self._load_holdout() if config.privacy else None

    def _load_holdout(self) -> dict | None:
        """The tokenised holdout set and its answer texts, or None (with a warning) when the default
        split is missing; an explicit holdout_split must exist."""
        config = self.config
        unknown = [a for a in config.attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"attacks {unknown} unknown; each must be one of {ATTACKS}")
        split = config.holdout_split or config.forget_split.replace("forget", "holdout", 1)
        try:
            rows = load_qa_split(config.data, split, what="holdout set")
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
            if config.holdout_split:
                raise
            warnings.warn(f"no holdout set {split!r}, so no privleak or attacks: {error}", stacklevel=3)
            return None
        rows = rows.select(range(min(len(rows), config.max_examples)))
        items = tokenize_split(rows, self.tokenizer, self.data_config, what="holdout set").items
        return {"split": split, "items": items, "texts": attacks.answer_texts(self.tokenizer, items)}

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

    def privacy(self, lm, reference_report: dict | None = None) -> dict:
        """report["privacy"]: extraction strength and exact memorization on the forget set's answers;
        with a holdout set the attacks' AUCs (mia_reference: per-example losses of reference_report)."""
        config, pad = self.config, self.tokenizer.pad_token_id
        forget_items = self.sets["forget"]["true"]
        parts = {"forget": {"items": forget_items}}
        if self.holdout is not None:
            parts["holdout"] = {"items": self.holdout["items"], "texts": self.holdout["texts"]}
            parts["forget"]["texts"] = attacks.answer_texts(self.tokenizer, forget_items)
        for name, part in parts.items():
            part["statistics"] = attacks.answer_statistics(
                lm, part["items"], pad, batch_size=config.batch_size, impl=config.impl
            )
            if "mia_gradnorm" in config.attacks and self.holdout is not None:
                part["gradient_norms"] = attacks.gradient_norms(
                    lm, part["items"], pad, p=config.gradnorm_p, impl=config.impl
                )
            if "mia_reference" in config.attacks and self.holdout is not None:
                part["reference_loss"] = attacks.reference_losses(reference_report, name, len(part["items"]))
        report = attacks.privacy_report(parts["forget"], parts.get("holdout"), config.attacks, k=config.k)
        if self.holdout is not None:
            report["holdout_split"] = self.holdout["split"]
        return report

    def evaluate(self, lm, *, reference_report: dict | None = None) -> dict:
        """Per-set statistics and model utility of a Hugging Face causal LM (and report["privacy"];
        reference_report: the evaluation of mia_reference's reference model)."""
        if "mia_reference" in self.config.attacks and self.holdout is not None:
            for name, items in (("forget", self.sets["forget"]["true"]), ("holdout", self.holdout["items"])):
                attacks.reference_losses(reference_report, name, len(items))  # fails before any work
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
        if self.config.privacy:
            report["privacy"] = self.privacy(lm, reference_report)
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


def add_privleak(report: dict, retain_report: dict | None) -> dict:
    """privleak: the Min-K% AUC's relative difference to the retain model's (attacks.add_privleak)."""
    return attacks.add_privleak(report, retain_report)


def summary(report: dict) -> dict:
    """The headline numbers, without per-example lists (privacy: privleak, extraction strength,
    exact memorization and each attack's AUC under its open-unlearning name)."""
    out = {k: report[k] for k in ("forget_quality", "model_utility") if k in report}
    for name in SETS:
        out.update({f"{name}/{k}": v for k, v in report[name].items() if isinstance(v, float)})
    section = report.get("privacy", {})
    out.update({k: section[k] for k in ("privleak", "extraction_strength", "exact_memorization") if k in section})
    out.update({k: section[k]["auc"] for k in ATTACKS if k in section})
    return out


def epoch_evaluator(config, tokenizer) -> EpochEvaluator:
    """The trainer's per-epoch TOFU evaluation (eval.every_epoch, eval.keep_best): the run's
    eval section into an Evaluator, forget quality against eval.retain_stats, a flat summary."""
    r = config.eval
    eval_config = EvalConfig(
        data=r.data,
        forget_split=r.forget_split,
        template=config.data.template,
        answer_prefix=config.data.answer_prefix,
        max_examples=r.max_examples,
        max_new_tokens=r.max_new_tokens,
        generate=r.generate,
        impl=config.model.impl,
    )
    evaluator = Evaluator(eval_config, tokenizer)
    retain = json.loads(Path(r.retain_stats).read_text()) if r.retain_stats else None
    per_set = ["probability", "truth_ratio", "mean_truth_ratio"] + (["rouge"] if r.generate else [])
    metrics = [f"{s}/{m}" for s in evaluator.sets for m in per_set]
    metrics += ["model_utility"] if r.generate else []
    metrics += ["forget_quality"] if retain is not None else []
    if eval_config.privacy:
        metrics += ["extraction_strength", "exact_memorization"]
        if evaluator.holdout is not None:
            metrics += [PRIVLEAK_ATTACK] + (["privleak"] if retain is not None else [])

    def evaluate(model):
        report = evaluator.evaluate(model)
        if retain is not None:
            add_privleak(add_forget_quality(report, retain), retain)
        return summary(report)

    notes = {
        "forget_quality": "needs eval.retain_stats (a `fastnpo eval --out` JSON of the retain model)",
        "model_utility": "needs eval.generate=true",
    }
    return EpochEvaluator(evaluate, tuple(metrics), notes)


def evaluate_path(
    model_path: str | Path,
    config: EvalConfig,
    retain_report: dict | None = None,
    device: str = "auto",
    reference_report: dict | None = None,
) -> dict:
    """`fastnpo eval`: load a model folder (or hub name) and its tokenizer, evaluate it; forget quality
    and privleak against retain_report (privleak: retain AUC 0.5, with a warning, without it)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tokenizer = load_tokenizer(str(model_path))
    evaluator = Evaluator(config, tokenizer)  # data and flags checked before the model loads
    lm = load_causal_lm(str(model_path), dtype="auto").to(device)
    report = evaluator.evaluate(lm, reference_report=reference_report)
    if retain_report is not None:
        add_forget_quality(report, retain_report)
    return add_privleak(report, retain_report)
