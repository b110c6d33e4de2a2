"""Reference log-prob cache: the frozen initial model's per-sequence log-probs, computed once.

NPO, DPO on refusals and friends compare the trained model's log-probs with those of the frozen initial
("reference") model on fixed data. Those numbers never change during unlearning, so one pass of the
initial model over every example a loss needs stores, per named set ("forget", "retain", "idk", ...),

- ``logps``: fp32 [num_examples], the summed log-prob of the example's target tokens;
- ``counts``: int64 [num_examples], the number of target tokens (token-mean = logps / counts),

indexed by the example's ``"index"``. Training then looks them up (``RefLogprobs.lookup``) and no
reference model is kept in memory.

The cache file is keyed by fingerprints of everything the numbers depend on (``cache_key`` over named
parts: the model weights, the tokenizer, the tokenized examples of each set, the template, max length,
dtype, ...), written atomically, checksummed, and re-validated on every load: a missing, truncated,
corrupt, stale or otherwise wrong file is reported and recomputed, never used.

This module knows nothing of the trainer: the caller supplies a ``compute`` callback (which may itself
be distributed) and, for several ranks, a ``barrier``.
"""

from .build import get_or_build_ref_logprobs, verify_ref_logprobs
from .fingerprint import (
    cache_key,
    fingerprint_config,
    fingerprint_examples,
    fingerprint_model,
    fingerprint_tokenizer,
    ref_cache_parts,
)
from .reference import item_logprobs, item_target_hidden_states, reference_logprobs, sharded_item_logprobs
from .store import FORMAT_VERSION, RefLogprobs, cache_path, load_ref_logprobs, save_ref_logprobs

__all__ = [
    "FORMAT_VERSION",
    "RefLogprobs",
    "cache_key",
    "cache_path",
    "fingerprint_config",
    "fingerprint_examples",
    "fingerprint_model",
    "fingerprint_tokenizer",
    "get_or_build_ref_logprobs",
    "item_logprobs",
    "item_target_hidden_states",
    "load_ref_logprobs",
    "ref_cache_parts",
    "reference_logprobs",
    "save_ref_logprobs",
    "sharded_item_logprobs",
    "verify_ref_logprobs",
]
