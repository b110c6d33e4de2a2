"""The U2A problem on a causal LM: J (DPO on the J set) and the candidates' unlearning losses.

PreferenceUnlearningProblem is what the scorer (scores.py) and the loop (bilevel.py) see: J and
its gradient, every candidate's loss l_i (NPO with beta 0.1, GA or GradDiff), the weighted inner
loss, and forward-mode derivatives of the l_i for the "jvp" scores. The reference model is the
one the problem starts from; its log-probs come once from fastnpo.refcache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ..data import collate
from ..losses import dpo_from_logprobs, nll_from_logprobs
from ..modeling import SequenceLogprobModel, output_weight
from ..ops import IGNORE_INDEX, aligned_labels
from ..ops.blocks import JVP_COLUMNS
from ..refcache import reference_logprobs
from . import preference as pref

UNLEARN_LOSSES = ("npo", "ga", "graddiff")


@dataclass
class ObjectiveConfig:
    """unlearn: the inner loss l_i. average_logprobs: NPO / GA on token-mean log-probs (U2A's
    code; GA is always per-example token-mean) instead of summed ones (the NPO paper).
    J = dpo_scale * DPO(dpo_beta) on summed log-probs unless dpo_average_logprobs."""

    unlearn: str = "npo"
    npo_beta: float = 0.1
    average_logprobs: bool = True
    graddiff_alpha: float = 1.0
    dpo_beta: float = 0.3
    dpo_scale: float = 1.0
    dpo_average_logprobs: bool = False


def _plain_sequence_logprobs(hidden, weight, labels, chunk: int = JVP_COLUMNS):
    """Summed target log-probs [B] in plain torch ops (so forward-mode AD flows through them),
    one vocabulary chunk of logits at a time (ops/blocks.py's fixed JVP width), never the full [B, T, V]."""
    targets = aligned_labels(labels, True, IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    picked = (hidden.float() * weight[safe].float()).sum(-1)
    parts = [
        torch.logsumexp(hidden.float() @ weight[v0 : v0 + chunk].float().T, dim=-1)
        for v0 in range(0, weight.shape[0], chunk)
    ]
    lse = torch.logsumexp(torch.stack(parts), dim=0)
    return ((picked - lse) * mask).sum(-1), mask.sum(-1)


class _JvpProbe(nn.Module):
    """The root module functional_call re-parametrises with dual tensors for "jvp"."""

    def __init__(self, wrapper: SequenceLogprobModel):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, batch):
        hidden = self.wrapper.hidden_states(batch)
        weight = output_weight(self.wrapper.lm)
        return _plain_sequence_logprobs(hidden, weight.to(hidden.dtype), batch["labels"])


@contextlib.contextmanager
def _eager_attention(model):
    # PyTorch's SDPA has no forward-AD rule; eager attention is plain matmuls and softmax.
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is not None:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if config is not None:
            config._attn_implementation = old


class PreferenceUnlearningProblem:
    """A causal LM, a PreferenceSplit's tokenised sets, and their cached reference log-probs.

    The interface the scorer and the loop use (a toy problem in the tests has the same one):
    parameters(), num_candidates, outer_backward() -> J (accumulates grad J), outer_value(),
    candidate_losses(indices) -> l [n] (grad or not, as the ambient mode), shared_loss() ->
    the term every l_i shares (or None), inner_loss(indices, weights, step), and
    losses_jvp(tangents, indices) -> (l, dl) for the "jvp" scores.
    """

    def __init__(
        self,
        model,
        sets: dict,
        objective: ObjectiveConfig,
        *,
        pad_id: int,
        batch_size: int = 16,
        impl: str = "auto",
        cache_dir: str = "",
        tokenizer=None,
    ):
        """sets: tokenised items (data.encode_qa dicts with "index" = position) named j_chosen,
        j_rejected, candidates, and optionally eval_chosen / eval_rejected and retain."""
        if objective.unlearn not in UNLEARN_LOSSES:
            raise ValueError(f"objective.unlearn must be one of {UNLEARN_LOSSES}, got {objective.unlearn!r}")
        if not sets.get("j_chosen") or len(sets["j_chosen"]) != len(sets.get("j_rejected", ())):
            raise ValueError("the J set (held-out preference pairs: j_chosen / j_rejected) is empty or unpaired")
        if not sets.get("candidates"):
            raise ValueError("there are no candidate negatives to unlearn (candidates is empty)")
        if objective.unlearn == "graddiff" and not sets.get("retain"):
            raise ValueError("objective.unlearn=graddiff needs a retain set (retain is empty)")
        self.objective, self.batch_size, self.sets, self.pad_id = objective, batch_size, sets, pad_id
        self.wrapper = SequenceLogprobModel(model, impl=impl)
        self.device = next(model.parameters()).device
        # The reference model is the one we start from: one pass over every set, now, and
        # never again (on disk too when cache_dir is given).
        self.ref = self._reference(tokenizer, cache_dir)
        self._probe = _JvpProbe(self.wrapper)

    @classmethod
    def from_split(cls, model, tokenizer, split, objective, *, template: str, max_length: int, **kwargs):
        """Tokenise a preference.PreferenceSplit (prompt through template, loss on the response)."""
        split.check()
        enc = dict(template=template, max_length=max_length)
        sets = {}
        sets["j_chosen"], sets["j_rejected"] = pref.encode_pairs(tokenizer, split.j, **enc)
        if split.eval:
            sets["eval_chosen"], sets["eval_rejected"] = pref.encode_pairs(tokenizer, split.eval, **enc)
        sets["candidates"] = pref.encode_responses(tokenizer, split.candidates, key="response", **enc)
        if split.retain:
            sets["retain"] = pref.encode_responses(tokenizer, split.retain, key="response", **enc)
        return cls(model, sets, objective, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer, **kwargs)

    def _reference(self, tokenizer, cache_dir: str) -> dict:
        # The same pass and cache key as the trainer and the HF route (refcache.reference_logprobs);
        # the examples' fingerprints cover the template and truncation.
        ref, _ = reference_logprobs(
            self.wrapper.lm,
            tokenizer,
            self.sets,
            pad_token_id=self.pad_id,
            batch_size=self.batch_size,
            impl=self.wrapper.impl,
            cache_dir=cache_dir or None,
            log=lambda message: None,
        )
        return {k: (ref.logps[k].to(self.device), ref.counts[k].to(self.device)) for k in self.sets}

    # -- plumbing
    @property
    def num_candidates(self) -> int:
        return len(self.sets["candidates"])

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.wrapper.parameters() if p.requires_grad]

    def _batches(self, items, indices=None):
        indices = range(len(items)) if indices is None else [int(i) for i in indices]
        indices = list(indices)
        for start in range(0, len(indices), self.batch_size):
            chosen = indices[start : start + self.batch_size]
            batch = collate([items[i] for i in chosen], self.pad_id)
            yield chosen, {k: v.to(self.device) for k, v in batch.items()}

    def logprobs(self, name: str, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and target counts of set `name` (differentiable if grad is on)."""
        logps, counts = [], []
        for _, batch in self._batches(self.sets[name], indices):
            lp, ct, _ = self.wrapper(batch)
            logps.append(lp.float())
            counts.append(ct)
        return torch.cat(logps), torch.cat(counts)

    def _ref(self, name, indices=None):
        logps, counts = self.ref[name]
        if indices is None:
            return logps, counts
        index = torch.as_tensor(list(indices), dtype=torch.long, device=logps.device)
        return logps[index], counts[index]

    # -- losses
    def _candidate_loss_from(self, logps, counts, indices):
        """Per-example l_i from summed log-probs (any autodiff mode: plain torch ops)."""
        o = self.objective
        counts = counts.to(logps.dtype).clamp(min=1)
        if o.unlearn != "npo":
            return logps / counts  # GA / GradDiff: minimising the token-mean log-prob is ascent
        ref, ref_counts = (t.to(logps.device) for t in self._ref("candidates", indices))
        if o.average_logprobs:
            logps, ref = logps / counts, ref / ref_counts.to(ref.dtype).clamp(min=1)
        return (2.0 / o.npo_beta) * F.softplus(o.npo_beta * (logps - ref))

    def candidate_losses(self, indices=None) -> torch.Tensor:
        indices = range(self.num_candidates) if indices is None else indices
        logps, counts = self.logprobs("candidates", indices)
        return self._candidate_loss_from(logps, counts, list(indices))

    def shared_loss(self, indices=None) -> torch.Tensor | None:
        """GradDiff's alpha * token-mean NLL on the retain set (or `indices` of it); else None."""
        if self.objective.unlearn != "graddiff":
            return None
        logps, counts = self.logprobs("retain", indices)
        return self.objective.graddiff_alpha * nll_from_logprobs(logps, counts)

    def inner_loss(self, indices, weights, step: int) -> torch.Tensor:
        """mean_b w_b l_b (+ the shared term on a retain mini-batch)."""
        loss = (weights.to(self.device) * self.candidate_losses(indices)).mean()
        if self.objective.unlearn == "graddiff":
            n = len(self.sets["retain"])
            start = (step * len(indices)) % n
            loss = loss + self.shared_loss([(start + j) % n for j in range(min(len(indices), n))])
        return loss

    def _dpo(self, prefix: str, chosen, rejected, indices=None):
        o = self.objective
        ref_c, ref_cn = self._ref(f"{prefix}_chosen", indices)
        ref_r, ref_rn = self._ref(f"{prefix}_rejected", indices)
        (c, cn), (r, rn) = chosen, rejected
        if o.dpo_average_logprobs:
            c, r = c / cn.clamp(min=1), r / rn.clamp(min=1)
            ref_c, ref_r = ref_c / ref_cn.clamp(min=1), ref_r / ref_rn.clamp(min=1)
        margin = (c - ref_c.to(c.device)) - (r - ref_r.to(r.device))
        loss = dpo_from_logprobs(c, r, ref_c.to(c.device), ref_r.to(r.device), beta=o.dpo_beta, scale=o.dpo_scale)
        return loss, margin

    def outer_backward(self) -> float:
        """J on the J set, its gradient accumulated into .grad one batch at a time."""
        n, total = len(self.sets["j_chosen"]), 0.0
        for idx, _ in self._batches(self.sets["j_chosen"]):
            loss, _ = self._dpo("j", self.logprobs("j_chosen", idx), self.logprobs("j_rejected", idx), idx)
            part = loss * (len(idx) / n)
            part.backward()
            total += part.item()
        return total

    @torch.no_grad()
    def outer_value(self) -> float:
        return float(self._dpo("j", self.logprobs("j_chosen"), self.logprobs("j_rejected"))[0])

    @torch.no_grad()
    def preference_metrics(self, prefix: str = "eval") -> dict:
        """DPO loss (J's definition), preference accuracy (implicit reward margin > 0: logp -
        ref of chosen above that of rejected), logp accuracy (token-mean logp chosen >
        rejected, no reference) and the mean token-mean log-probs."""
        if f"{prefix}_chosen" not in self.sets:
            return {}
        chosen, rejected = self.logprobs(f"{prefix}_chosen"), self.logprobs(f"{prefix}_rejected")
        loss, margin = self._dpo(prefix, chosen, rejected)
        mean_c, mean_r = chosen[0] / chosen[1].clamp(min=1), rejected[0] / rejected[1].clamp(min=1)
        return {
            "dpo_loss": float(loss),
            "pref_accuracy": float((margin > 0).float().mean()),
            "logp_accuracy": float((mean_c > mean_r).float().mean()),
            "chosen_logp": float(mean_c.mean()),
            "rejected_logp": float(mean_r.mean()),
        }

    # -- forward mode
    def losses_jvp(self, tangents: list[torch.Tensor], indices=None):
        """(l_i, <grad l_i, tangent>) of the candidates (and of the shared term) by forward AD."""
        named = [(n, p) for n, p in self._probe.named_parameters() if p.requires_grad]
        if len(named) != len(tangents):
            raise ValueError(f"{len(tangents)} tangents for {len(named)} trainable parameters")
        indices = list(range(self.num_candidates)) if indices is None else list(indices)
        values, derivs = [], []
        with torch.no_grad(), fwAD.dual_level(), _eager_attention(self.wrapper.lm):
            params = {n: fwAD.make_dual(p.detach(), t.to(p.dtype)) for (n, p), t in zip(named, tangents, strict=True)}
            for idx, batch in self._batches(self.sets["candidates"], indices):
                logps, counts = torch.func.functional_call(self._probe, params, (batch,))
                primal, tangent = fwAD.unpack_dual(self._candidate_loss_from(logps, counts, idx))
                values.append(primal.clone())
                derivs.append(tangent.clone())
            shared = None
            if self.objective.unlearn == "graddiff":
                pairs = [
                    torch.func.functional_call(self._probe, params, (b,)) for _, b in self._batches(self.sets["retain"])
                ]
                logps, counts = (torch.cat(t) for t in zip(*pairs, strict=True))
                nll = self.objective.graddiff_alpha * nll_from_logprobs(logps, counts)
                shared = tuple(t.clone() for t in fwAD.unpack_dual(nll))
        return torch.cat(values), torch.cat(derivs), shared
