"""MUSE evaluation of a causal LM, with open-unlearning's definitions (configs/eval/muse.yaml):

* forget_knowmem_ROUGE / retain_knowmem_ROUGE: mean ROUGE-L F1 of the greedy answer (at most 32
  new tokens, cut at the stop words) to knowmem's forget_qa / retain_qa questions, each asked after
  the few-shot examples of <split>_icl in the "Question: ... / Answer: ..." template;
* forget_verbmem_ROUGE: mean ROUGE-L F1 of the greedy continuation (at most 128 new tokens) of each
  verbmem prompt against its gold continuation;
* privleak: the Min-K% (k = 0.4) attack's AUC on privleak's forget vs holdout texts, as the relative
  difference of 1 - AUC to the retrained model's, in percent (fastnpo.tofu.privacy_metrics.privleak;
  the retrained model's AUC from its own report, 0.5 with a warning without one);
* extraction_strength (and exact_memorization, which muse.yaml leaves commented out) on the verbmem
  forget set: the gold continuation's tokens after the prompt (fastnpo.tofu.privacy).

Token statistics come from the fused pass (fastnpo.tofu.attacks.answer_statistics: no
[tokens x vocab] logits). Differences from open-unlearning's code: docs/muse.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ..modeling import greedy_generate
from ..tofu import attacks
from ..tofu import privacy as privacy_metrics
from .data import MuseData, load_muse
from .metrics import (
    KNOWMEM_MAX_NEW_TOKENS,
    KNOWMEM_STOPWORDS,
    VERBMEM_MAX_NEW_TOKENS,
    rouge_l_f1,
    truncate_at_stopwords,
)
from .minimuse import TEMPLATE, knowmem_prompt

NUMBERS = (
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    privacy_metrics.PRIVLEAK_ATTACK,
)


@dataclass
class MuseEvalConfig:
    """Settings (open-unlearning's defaults). max_length: the most text tokens scored per privleak
    text or verbmem continuation (MUSE_MIA / MUSE_forget_verbmem: 2048). max_examples: cap on every
    set but the few-shot ones (None: all). privacy: privleak, extraction strength, exact memorization.
    template: the few-shot template tags (user_start, user_end, asst_start, asst_end)."""

    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS
    stopwords: tuple[str, ...] = KNOWMEM_STOPWORDS
    template: dict = field(default_factory=lambda: dict(TEMPLATE))
    knowmem_batch_size: int = 16
    verbmem_batch_size: int = 8
    batch_size: int = 8
    max_length: int = 2048
    max_examples: int | None = None
    privacy: bool = True
    k: float = privacy_metrics.MIN_K
    impl: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in (
                "knowmem_max_new_tokens",
                "verbmem_max_new_tokens",
                "knowmem_batch_size",
                "verbmem_batch_size",
                "batch_size",
                "max_length",
            ):
                if type(value) is not int or value < 1:
                    raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.max_examples is not None and (type(self.max_examples) is not int or self.max_examples < 1):
            raise ValueError(f"max_examples must be a positive int or None, got {self.max_examples!r}")
        if isinstance(self.stopwords, str) or not all(isinstance(w, str) for w in self.stopwords):
            raise ValueError(f"stopwords must be a sequence of strings, got {self.stopwords!r}")
        self.stopwords = tuple(self.stopwords)
        missing = [
            k for k in TEMPLATE if not isinstance(self.template, dict) or not isinstance(self.template.get(k), str)
        ]
        if missing:
            raise ValueError(f"template must be a dict of strings with keys {list(TEMPLATE)}; missing {missing}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 < self.k <= 1:
            raise ValueError(f"k must be a fraction in (0, 1], got {self.k!r}")
        for name in ("privacy", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """ids as `tokenizer(text, add_special_tokens=True)` gives them for a Llama tokenizer: with <bos>."""
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else list(ids)


def _encode(tokenizer, text: str) -> list[int]:
    return _with_bos(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])


def _decode(tokenizer, ids) -> str:
    # open-unlearning decodes generations and gold texts with these flags.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


class _StopWhenAllHaveStopword(StoppingCriteria):
    """Stop generating once every row's new text holds one of the stop strings (or <eos>); the
    text is cut afterwards, so this only saves time (the kept text is the same as without it)."""

    def __init__(self, tokenizer, start: int, stopwords: tuple[str, ...]):
        self.tokenizer, self.start, self.stopwords = tokenizer, start, tuple(w for w in stopwords if w)

    def __call__(self, input_ids, scores, **kwargs):
        eos = self.tokenizer.eos_token_id
        done = []
        for row in input_ids[:, self.start :].tolist():
            text = _decode(self.tokenizer, row)
            done.append((eos is not None and eos in row) or any(w in text for w in self.stopwords))
        return torch.tensor([all(done)] * input_ids.shape[0], device=input_ids.device)


def _knowmem(lm, tokenizer, qa, icl, config: MuseEvalConfig, desc: str) -> dict:
    shots = [{"question": q, "answer": a} for q, a in zip(icl["question"], icl["answer"], strict=True)]
    prompts = [_encode(tokenizer, knowmem_prompt(shots, q, config.template)) for q in qa["question"]]
    stopwords = tuple(config.stopwords)
    raw = greedy_generate(
        lm,
        tokenizer,
        prompts,
        max_new_tokens=config.knowmem_max_new_tokens,
        batch_size=config.knowmem_batch_size,
        strip=False,  # stop-word truncation must see the leading whitespace: open-unlearning cuts, then strips
        decode=lambda ids: _decode(tokenizer, ids),
        stopping_criteria=(
            (lambda width: StoppingCriteriaList([_StopWhenAllHaveStopword(tokenizer, width, stopwords)]))
            if stopwords
            else None
        ),
        desc=desc,
        progress=config.progress,
    )
    eos_text = _decode_special(tokenizer)
    answers = [truncate_at_stopwords(t, (eos_text, *config.stopwords)) for t in raw]
    gold = [_decode(tokenizer, tokenizer(a, add_special_tokens=False)["input_ids"]).strip() for a in qa["answer"]]
    scores = rouge_l_f1(answers, gold)
    return {
        "rouge": float(np.mean(scores)),
        "examples": [
            {"question": q, "gold": g, "generation": a, "rougeL_f1": s}
            for q, g, a, s in zip(qa["question"], gold, answers, scores, strict=True)
        ],
    }


def _decode_special(tokenizer) -> str:
    """tokenizer.decode([eos]) as open-unlearning puts it first among the stop words."""
    eos = tokenizer.eos_token_id
    return "" if eos is None else tokenizer.decode([eos])


def _verbmem_items(tokenizer, verbmem, max_length: int) -> tuple[list[list[int]], list[dict]]:
    """Prompt ids (<bos> + prompt) and scoring items: prompt + " " + gold, labels on the gold's tokens
    (the first max_length), as open-unlearning's CompletionDataset with insert_space."""
    prompts, items = [], []
    for i, (prompt, gold) in enumerate(zip(verbmem["prompt"], verbmem["gt"], strict=True)):
        prefix = _encode(tokenizer, prompt)
        full = _encode(tokenizer, prompt + " " + gold)[: len(prefix) + max_length]
        if len(full) <= len(prefix):
            raise ValueError(f"verbmem/forget row {i}: the gold continuation adds no token after the prompt")
        prompts.append(prefix)
        items.append({"index": i, "input_ids": full, "labels": [-100] * len(prefix) + full[len(prefix) :]})
    return prompts, items


def _text_items(tokenizer, texts, max_length: int) -> list[dict]:
    """A privleak text as open-unlearning's CompletionDataset with no prefix: <bos> + its first
    max_length tokens, every token after the first a target."""
    items = []
    for i, text in enumerate(texts):
        ids = _encode(tokenizer, text)[: 1 + max_length]
        if len(ids) < 2:
            raise ValueError(f"privleak text {i} has no token to score")
        items.append({"index": i, "input_ids": ids, "labels": [-100, *ids[1:]]})
    return items


def _statistics(lm, tokenizer, items, config: MuseEvalConfig, desc: str) -> list[dict]:
    out = []
    step = config.batch_size
    for start in tqdm(range(0, len(items), step), desc=desc, disable=not config.progress, leave=False):
        out += attacks.answer_statistics(
            lm, items[start : start + step], tokenizer.pad_token_id, batch_size=step, impl=config.impl
        )
    return out


def retain_auc(retain_report: dict | None) -> float | None:
    """The retrained model's Min-K% AUC from its evaluate_muse report (None without one)."""
    if retain_report is None:
        return None
    try:
        return float(retain_report[privacy_metrics.PRIVLEAK_ATTACK])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"retain_report has no {privacy_metrics.PRIVLEAK_ATTACK!r} AUC: pass the retrained model's "
            "evaluate_muse report (evaluated with privacy=True)"
        ) from None


def evaluate_muse(
    model,
    tokenizer,
    layout: str | Path | MuseData,
    config: MuseEvalConfig | None = None,
    *,
    retain_report: dict | None = None,
) -> dict:
    """The MUSE numbers of a Hugging Face causal LM on a layout (hub name, local folder or a loaded
    MuseData). Returns {number: value for NUMBERS} (the privacy ones only with config.privacy) and
    "details": per-example generations and scores, the attack's per-example scores.
    retain_report: the retrained model's report, for privleak (None: its AUC is taken as 0.5, with a
    warning, as open-unlearning does)."""
    config = MuseEvalConfig() if config is None else config
    _check_inputs(model, tokenizer, config)
    reference_auc = retain_auc(retain_report)  # fails before any work
    data = (
        layout
        if isinstance(layout, MuseData)
        else load_muse(layout, max_examples=config.max_examples, privacy=config.privacy)
    )
    if config.privacy and data.privleak_forget is None:
        raise ValueError("config.privacy is set but the MuseData was loaded without privleak's sets (privacy=False)")
    was_training = model.training
    model.eval()
    try:
        report, details = {}, {}
        for part, qa, icl in (
            ("forget", data.forget_qa, data.forget_qa_icl),
            ("retain", data.retain_qa, data.retain_qa_icl),
        ):
            result = _knowmem(model, tokenizer, qa, icl, config, f"{part} knowmem")
            report[f"{part}_knowmem_ROUGE"] = result["rouge"]
            details[f"{part}_knowmem"] = result["examples"]
        report["forget_verbmem_ROUGE"], details["forget_verbmem"], items = _verbmem(model, tokenizer, data, config)
        if config.privacy:
            numbers, details[privacy_metrics.PRIVLEAK_ATTACK] = _privacy(
                model, tokenizer, data, items, config, reference_auc
            )
            report.update(numbers)
    finally:
        model.train(was_training)
    report["details"] = details
    return report


def _check_inputs(model, tokenizer, config) -> None:
    """evaluate_muse's arguments, refused before any work when they cannot be what it needs."""
    if not isinstance(config, MuseEvalConfig):
        raise ValueError(f"config must be a MuseEvalConfig, got {type(config).__name__}")
    if not hasattr(model, "generate") or not hasattr(model, "parameters"):
        raise ValueError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise ValueError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a pad_token nor an eos_token to pad batches with")


def _verbmem(lm, tokenizer, data: MuseData, config: MuseEvalConfig) -> tuple[float, list[dict], list[dict]]:
    """forget_verbmem_ROUGE, its per-example details, and the verbmem items (prompt + gold
    continuation tokens), which extraction strength scores next."""
    prompts, items = _verbmem_items(tokenizer, data.verbmem, config.max_length)
    raw = greedy_generate(
        lm,
        tokenizer,
        prompts,
        max_new_tokens=config.verbmem_max_new_tokens,
        batch_size=config.verbmem_batch_size,
        strip=False,
        decode=lambda ids: _decode(tokenizer, ids),
        desc="forget verbmem",
        progress=config.progress,
    )
    eos_text = _decode_special(tokenizer)
    continuations = [truncate_at_stopwords(t, (eos_text,)) for t in raw]
    gold = [_decode(tokenizer, item["input_ids"][len(p) :]).strip() for p, item in zip(prompts, items, strict=True)]
    scores = rouge_l_f1(continuations, gold)
    examples = [
        {"prompt": p, "gold": g, "generation": c, "rougeL_f1": s}
        for p, g, c, s in zip(data.verbmem["prompt"], gold, continuations, scores, strict=True)
    ]
    return float(np.mean(scores)), examples, items


def _privacy(lm, tokenizer, data: MuseData, items, config: MuseEvalConfig, reference_auc) -> tuple[dict, dict]:
    """(extraction strength, exact memorization, the attack's AUC, the retain AUC, privleak; the
    attack's per-example scores on privleak's forget and holdout texts)."""
    stats = _statistics(lm, tokenizer, items, config, "verbmem statistics")
    numbers = {
        "extraction_strength": float(np.mean([privacy_metrics.extraction_strength(s["is_argmax"]) for s in stats])),
        "exact_memorization": privacy_metrics.mean_ignoring_none(
            [privacy_metrics.exact_memorization(s["is_argmax"]) for s in stats]
        ),
    }
    scores = {}
    for part, rows in (("forget", data.privleak_forget), ("holdout", data.privleak_holdout)):
        part_stats = _statistics(
            lm,
            tokenizer,
            _text_items(tokenizer, rows["text"], config.max_length),
            config,
            f"privleak {part}",
        )
        scores[part] = [privacy_metrics.min_k_score(s["logprob"], config.k) for s in part_stats]
    auc = privacy_metrics.auc(scores["forget"], scores["holdout"])
    numbers[privacy_metrics.PRIVLEAK_ATTACK] = auc
    numbers["retain_auc"] = reference_auc
    numbers["privleak"] = privacy_metrics.privleak(auc, reference_auc)
    return numbers, scores


def summary(report: dict) -> dict:
    """The numbers of an evaluate_muse report, without the per-example details."""
    return {
        k: v
        for k, v in report.items()
        if k in NUMBERS and v is not None and not (isinstance(v, float) and math.isnan(v))
    }


def evaluate_muse_path(
    model_path: str | Path,
    layout: str | Path,
    config: MuseEvalConfig | None = None,
    *,
    retain_report: dict | None = None,
    device: str = "auto",
) -> dict:
    """`fastnpo eval --benchmark muse`: load a model folder (or hub name) and its tokenizer, evaluate it."""
    from ..modeling import load_causal_lm, load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    config = MuseEvalConfig() if config is None else config
    tokenizer = load_tokenizer(str(model_path))
    data = load_muse(
        layout, max_examples=config.max_examples, privacy=config.privacy
    )  # data checked before the model loads
    lm = load_causal_lm(str(model_path), dtype="auto").to(device)
    return evaluate_muse(lm, tokenizer, data, config, retain_report=retain_report)
