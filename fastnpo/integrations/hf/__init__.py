"""Hugging Face drop-ins: a patched causal-LM forward, an unlearning Trainer, reference log-prob columns.

Three routes, from the least to the most invasive:

- ``patch_model(model)`` (patch.py): the model's forward, given ``labels``, returns the usual
  token-mean cross-entropy computed by fastnpo's fused linear + log-softmax op, with ``logits=None``.
  Works with any ``transformers.Trainer`` (and PEFT/LoRA) as is.
- ``UnlearningTrainer`` (trainer.py): a ``transformers.Trainer`` that minimises a fastnpo unlearning
  loss (any method of fastnpo.methods but those that need the reference's full distribution) on
  datasets whose cached reference log-probs travel as columns.
- ``add_reference_logprobs`` / ``pair_with_retain`` / ``UnlearningCollator`` (data.py): the data side.
"""

from .data import UnlearningCollator, add_reference_logprobs, column_prefix, pair_with_retain
from .patch import FusedCausalLMOutput, PatchHandle, is_patched, patch_model, unpatch_model
from .trainer import UnlearningTrainer

__all__ = [
    "FusedCausalLMOutput",
    "PatchHandle",
    "UnlearningCollator",
    "UnlearningTrainer",
    "add_reference_logprobs",
    "column_prefix",
    "is_patched",
    "pair_with_retain",
    "patch_model",
    "unpatch_model",
]
