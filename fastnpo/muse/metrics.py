"""MUSE's text metrics as pure functions: stop-word truncation of a generation and ROUGE-L F1.

Definitions from open-unlearning (src/evals/metrics/utils.py ``eval_text_similarity``,
configs/eval/muse_metrics/*_ROUGE.yaml), no code copied:

* a generation is cut at each stop word in turn (the tokenizer's decoded EOS first, then the
  configured ones): text = text.split(word)[0] for every word that occurs, then stripped;
* the score of one example is ``rouge_score``'s ROUGE-L F-measure with the Porter stemmer,
  ``RougeScorer(["rougeL"], use_stemmer=True).score(target=gold, prediction=generation)``;
  the reported number is the mean over the examples.
"""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer

# configs/eval/muse_metrics/{forget,retain}_knowmem_ROUGE.yaml
KNOWMEM_STOPWORDS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")
KNOWMEM_MAX_NEW_TOKENS = 32
VERBMEM_MAX_NEW_TOKENS = 128  # forget_verbmem_ROUGE.yaml; no stop words

_SCORER: rouge_scorer.RougeScorer | None = None


def _scorer() -> rouge_scorer.RougeScorer:
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def _strings(values, name: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(v).__name__}")
    return list(values)


def truncate_at_stopwords(text: str, stopwords: Sequence[str]) -> str:
    """Cut text at each stop word in turn (the part before its first occurrence), then strip.
    Empty stop words are skipped. The order matters only when stop words overlap, and is
    open-unlearning's: the caller passes the decoded EOS first, then the configured words."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    for word in _strings(stopwords, "stopwords"):
        if word and word in text:
            text = text.split(word)[0]
    return text.strip()


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F1 (F-measure of LCS precision and recall, rouge_score's tokenisation:
    lower case, runs of non-alphanumeric characters split, Porter stemming); 0 when either side
    has no token."""
    preds, refs = _strings(predictions, "predictions"), _strings(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"predictions has {len(preds)} items but references has {len(refs)}; they must match")
    if not preds:
        raise ValueError("predictions must not be empty")
    scorer = _scorer()
    return [float(scorer.score(ref, pred)["rougeL"].fmeasure) for pred, ref in zip(preds, refs, strict=True)]
