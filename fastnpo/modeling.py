"""A causal LM seen as a per-sequence log-prob function: backbone -> hidden -> fused log-prob op.

`SequenceLogprobModel` wraps a Hugging Face causal LM so that the fused log-prob computation
runs inside the ROOT module's forward. Under FSDP2 that matters: the root's pre-forward hook
gathers the lm_head weight, and its gradient is reduce-scattered like any other parameter
(calling the backbone directly, or using lm_head.weight.full_tensor() outside the root
forward, silently skips that reduction).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .ops import IGNORE_INDEX, aligned_labels, packed_sequence_logprobs, sequence_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def _not_loadable(what: str, source: str, error: Exception) -> Exception:
    """transformers' OSError / ValueError (long messages, often about hub repo ids) as one clear line."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).expanduser().is_dir():
        return ValueError(f"{what} {source!r}: cannot load from this folder ({first.rstrip(': ')})")
    return FileNotFoundError(f"{what} {source!r}: no such folder, and not a model found on the hub ({first})")


def load_tokenizer(source: str, *, what: str = "tokenizer"):
    """AutoTokenizer from a hub name or folder; a tokenizer without a pad token pads with eos
    (padding is masked out of every loss and metric). what: how errors name the source."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:  # a folder without tokenizer files gives a ValueError
        raise _not_loadable(what, source, error) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def config_dtype(config) -> str:
    """The dtype a transformers config names ("bfloat16", ...): `dtype` (transformers 5), else
    `torch_dtype` (older config.json files); "" when it names none or one fastnpo does not train in."""
    value = None
    for item in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):
        if item is None:
            continue
        # vars(): transformers 5 keeps torch_dtype only as a deprecated alias of dtype
        value = getattr(item, "dtype", None) or vars(item).get("torch_dtype")
        if value is not None:
            break
    name = str(value).removeprefix("torch.") if value is not None else ""
    return name if name in DTYPES else ""


def checkpoint_dtype(name_or_path: str, *, what: str = "model") -> str:
    """What dtype "auto" means for a checkpoint: the one its config.json names, else float32."""
    from transformers import AutoConfig

    try:
        return config_dtype(AutoConfig.from_pretrained(name_or_path)) or "float32"
    except (OSError, ValueError) as error:
        raise _not_loadable(what, name_or_path, error) from None


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    random_init: bool = False,
    what: str = "model",
) -> nn.Module:
    """A causal LM from a hub name or folder; random_init builds the architecture of its
    config.json with fresh random weights (benchmarks). dtype "auto": the checkpoint's own.
    what: how errors name the source (e.g. "model.name_or_path")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be one of {[*sorted(DTYPES), 'auto']}, got {dtype!r}")
    kwargs = dict(dtype=DTYPES.get(dtype, "auto"), attn_implementation=attn_implementation)
    try:
        if random_init:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), **kwargs)
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise _not_loadable(what, name_or_path, error) from None


def output_weight(model: nn.Module) -> torch.Tensor:
    """The lm_head weight [V, D] of a Hugging Face causal LM (tied embeddings included)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() returned "
            f"{type(head).__name__}): fastnpo needs the lm_head weight; pass a *ForCausalLM model"
        )
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias, which the fused op does not support")
    return head.weight


def decoder(model: nn.Module) -> nn.Module:
    """The backbone whose last_hidden_state feeds the lm_head (final norm applied)."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None or body is model:
        raise ValueError(f"cannot find the decoder backbone of {type(model).__name__}")
    return body


LOGIT_RESCALING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "output_multiplier_scale",
)


def check_supported(model: nn.Module) -> None:
    """Refuse models whose logits are not plain hidden @ lm_head.T (soft-capping, logit scaling),
    looking at the config and, for multimodal models, its text config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    for cfg in {id(c): c for c in (config, text) if c is not None}.values():
        for name in LOGIT_RESCALING:
            value = getattr(cfg, name, None)
            if value not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"{type(model).__name__} rescales its logits ({name}={value}): its logits are not "
                    "hidden @ lm_head.weight.T, so fastnpo's fused log-prob op cannot reproduce them"
                )


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft) from a LoraConfig; the base weights and the
    lm_head stay frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        ),
    )


class SequenceLogprobModel(nn.Module):
    """forward(batch) -> (summed log-probs [E], target-token counts [E], logits) of each example.

    A batch is either padded (`input_ids`, `attention_mask`, `labels` [B, T]: E = B) or packed
    by data.collate_packed (`input_ids`, `position_ids`, `labels`, `segment_ids`, `index`:
    E = number of examples). Packed rows have no attention_mask: with use_cache=False,
    transformers builds the block-diagonal causal mask from the restarting position_ids.
    """

    def __init__(self, causal_lm: nn.Module, *, impl: str = "auto"):
        super().__init__()
        check_supported(causal_lm)
        output_weight(causal_lm)
        decoder(causal_lm)
        self.lm = causal_lm
        self.impl = impl

    def hidden_states(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return decoder(self.lm)(**inputs, use_cache=False).last_hidden_state

    def forward(self, batch: dict, logits_rows: slice | None = None):
        """(logps [E], counts [E], logits): logits are the full [rows, T, V] logits of the
        padded batch's `logits_rows` (only NPO+KL asks, for its KL term), else None."""
        hidden = self.hidden_states(batch)
        weight = output_weight(self.lm)
        if weight.dtype != hidden.dtype:  # under autocast the backbone hands back bf16
            weight = weight.to(hidden.dtype)
        labels = batch["labels"]
        targets = aligned_labels(labels, True, IGNORE_INDEX)
        logits = None if logits_rows is None else (hidden[logits_rows] @ weight.T).float()
        if "segment_ids" not in batch:
            logps = sequence_logprobs(hidden, weight, labels, impl=self.impl)
            return logps, (targets != IGNORE_INDEX).sum(dim=1), logits
        logps, counts = packed_sequence_logprobs(hidden, weight, batch, impl=self.impl)
        return logps, counts, logits


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy answers (decoded, stripped) to tokenized prompts, batched with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]
