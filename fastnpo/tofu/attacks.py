"""The model side of the privacy metrics: per-example answer-token statistics from one fused pass
(fastnpo.ops.token_statistics: no [tokens x vocab] logits), per-example gradient norms, and the
report that privacy.py's formulas make of them (attacks' AUCs, privleak, extraction strength).

evaluate.py calls `privacy_report` on the forget set's answers and the holdout set; `add_privleak`
then compares the Min-K% AUC with the retain model's.
"""

import warnings

import numpy as np
import torch

from ..data import collate
from ..modeling import final_hidden_and_weight
from ..ops import IGNORE_INDEX, aligned_labels, token_logprobs, token_statistics
from . import privacy

# token_statistics has no split design (nor its deprecated name): its default instead
STATISTICS_IMPL = {"split": "auto", "cublas": "auto"}


def _hidden_and_weight(lm, batch: dict):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    return final_hidden_and_weight(lm, {**inputs, "use_cache": False})


@torch.no_grad()
def answer_statistics(lm, items: list[dict], pad_token_id: int, *, batch_size: int, impl: str = "auto"):
    """Per item: {"logprob", "mean", "second_moment", "is_argmax"} numpy arrays over its answer tokens,
    in order (the last predicts the end-of-answer token)."""
    device = next(lm.parameters()).device
    impl = STATISTICS_IMPL.get(impl, impl)
    out = []
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start : start + batch_size], pad_token_id).items()}
        hidden, weight = _hidden_and_weight(lm, batch)
        stats = token_statistics(hidden, weight, batch["labels"], shift=True, impl=impl)
        kept = aligned_labels(batch["labels"], True, IGNORE_INDEX) != IGNORE_INDEX
        for row in range(kept.shape[0]):
            mask = kept[row]
            out.append({name: getattr(stats, name)[row][mask].cpu().numpy() for name in stats._fields})
    return out


def answer_texts(tokenizer, items: list[dict]) -> list[str]:
    """The answer tokens (labels other than ignore_index) decoded without special tokens: ZLib's text."""
    return [
        tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX], skip_special_tokens=True) for item in items
    ]


def gradient_norms(lm, items: list[dict], pad_token_id: int, *, p: float = 2, impl: str = "auto") -> list[list[float]]:
    """Per item (one at a time), the p-norm of every parameter's gradient of the token-mean NLL of its
    answer tokens but the last, through the fused op's backward. The parameters' .grad are restored."""
    device = next(lm.parameters()).device
    params = [q for q in lm.parameters() if q.requires_grad]
    saved = [q.grad for q in params]
    out = []
    try:
        for item in items:
            for q in params:
                q.grad = None
            batch = {k: v.to(device) for k, v in collate([item], pad_token_id).items()}
            with torch.enable_grad():
                hidden, weight = _hidden_and_weight(lm, batch)
                targets = aligned_labels(batch["labels"], True, IGNORE_INDEX)[0]
                positions = (targets != IGNORE_INDEX).nonzero()[:-1, 0]
                if positions.numel() == 0:
                    out.append([])
                    continue
                logps = token_logprobs(hidden[0, positions], weight, targets[positions], impl=impl)
                (-logps.mean()).backward()
            out.append([float(q.grad.detach().norm(p=p)) for q in params if q.grad is not None])
    finally:
        for q, grad in zip(params, saved, strict=True):
            q.grad = grad
    return out


def _attack(name: str, forget: dict, holdout: dict, k: float) -> list[list[float]]:
    """Per-example scores of attack `name` on both sets, [forget scores, holdout scores]."""
    scores = []
    for part in (forget, holdout):
        stats = part["statistics"]
        if name == "mia_loss":
            scores.append([privacy.loss_score(s["logprob"]) for s in stats])
        elif name == "mia_zlib":
            scores.append([privacy.zlib_score(s["logprob"], t) for s, t in zip(stats, part["texts"], strict=True)])
        elif name == "mia_min_k":
            scores.append([privacy.min_k_score(s["logprob"], k) for s in stats])
        elif name == "mia_min_k_plus_plus":
            scores.append(
                [
                    privacy.min_k_plus_plus_score(
                        s["logprob"], s["mean"], s["second_moment"], k, variance=s["variance"]
                    )
                    for s in stats
                ]
            )
        elif name == "mia_reference":
            own = [privacy.loss_score(s["logprob"]) for s in stats]
            scores.append([privacy.reference_score(a, b) for a, b in zip(own, part["reference_loss"], strict=True)])
        elif name == "mia_gradnorm":
            # An item with no token left has no gradient: open-unlearning's mean of nothing is NaN; 0 here.
            scores.append([privacy.gradnorm_score(n) if n else 0.0 for n in part["gradient_norms"]])
        else:
            raise ValueError(f"unknown attack {name!r}; known: {privacy.ATTACKS}")
    return scores


def privacy_report(forget: dict, holdout: dict | None, attacks=(), *, k: float = privacy.MIN_K) -> dict:
    """Extraction strength and exact memorization of the forget set and, with a holdout set, the AUC
    of mia_min_k (privleak's attack) and of every attack in `attacks`.

    forget / holdout: {"statistics": answer_statistics(...), and what the attacks need: "texts"
    (mia_zlib), "reference_loss" (mia_reference: per-example LOSS of the reference model),
    "gradient_norms" (mia_gradnorm)}.
    """
    stats = forget["statistics"]
    report = {
        "extraction_strength": float(np.mean([privacy.extraction_strength(s["is_argmax"]) for s in stats])),
        "exact_memorization": privacy.mean_ignoring_none([privacy.exact_memorization(s["is_argmax"]) for s in stats]),
    }
    if holdout is None:
        return report
    report["per_example_loss"] = {
        name: [privacy.loss_score(s["logprob"]) for s in part["statistics"]]
        for name, part in (("forget", forget), ("holdout", holdout))
    }
    for name in dict.fromkeys([privacy.PRIVLEAK_ATTACK, *attacks]):
        scores = _attack(name, forget, holdout, k)
        report[name] = {"auc": privacy.auc(*scores), "forget": scores[0], "holdout": scores[1]}
    return report


def retain_auc(retain_report: dict | None) -> float | None:
    """The retain model's Min-K% AUC from its evaluation report (None when it has none)."""
    try:
        return float(retain_report["privacy"][privacy.PRIVLEAK_ATTACK]["auc"])
    except (KeyError, TypeError):
        return None


def add_privleak(report: dict, retain_report: dict | None) -> dict:
    """report["privacy"]["privleak"] against the retain model's AUC (0.5 with a warning without one)."""
    section = report.get("privacy", {})
    if privacy.PRIVLEAK_ATTACK not in section:
        return report
    reference = retain_auc(retain_report)
    if retain_report is not None and reference is None:
        warnings.warn("the retain model's report has no privacy/mia_min_k AUC (an older fastnpo eval?)", stacklevel=2)
    section["retain_auc"] = reference
    section["privleak"] = privacy.privleak(section[privacy.PRIVLEAK_ATTACK]["auc"], reference)
    return report


def reference_losses(reference_report: dict | None, part: str, count: int) -> list[float]:
    """mia_reference's per-example reference LOSS on `part` (forget / holdout) from a report."""
    try:
        losses = reference_report["privacy"]["per_example_loss"][part]
    except (KeyError, TypeError):
        raise ValueError(
            "mia_reference needs the reference model's evaluation (a `fastnpo eval --out` JSON with "
            "privacy on the same holdout split): pass it as --reference-stats"
        ) from None
    if len(losses) != count:
        raise ValueError(f"the reference report has {len(losses)} {part} examples, this evaluation {count}")
    return losses
