"""A causal LM seen as a per-example log-prob function: backbone -> hidden -> fused log-prob op.

The one forward every route shares: final_hidden_and_weight (backbone and lm_head weight), then
example_logprobs (per-example log-probs, optionally a per-token term from the same token
log-probs) or one_pass_loss (a whole separable loss, gradients in the forward).
`SequenceLogprobModel` runs them inside the ROOT module's forward (the trainer, the reference pass,
evaluation); the Hugging Face patch runs them inside the patched forward. Under FSDP2 that matters:
the root's pre-forward hook gathers the lm_head weight, and its gradient is reduce-scattered like
any other parameter (calling the backbone directly, or using lm_head.weight.full_tensor() outside
the root forward, silently skips that reduction).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .ops import IGNORE_INDEX, aligned_labels, example_loss, target_owner, token_logprobs

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


LOSS_DESIGNS = ("auto", "one_pass", "two_call")


def uses_one_pass(loss_design: str, device: torch.device, separable: bool = True) -> bool:
    """Whether a loss of per-example log-probs runs in the one-pass design (ops.example_loss: both
    gradients in the forward) rather than as token log-probs whose backward computes them.
    "auto": one_pass on CUDA when the loss allows it (separable: a sum of per-example terms, of
    per-example and per-token ones, or of per-pair ones: Method.one_pass), else two_call. The rule the trainer
    (model.loss_design), the HF patch and UnlearningTrainer share."""
    if loss_design not in LOSS_DESIGNS:
        raise ValueError(f"loss_design must be one of {LOSS_DESIGNS}, got {loss_design!r}")
    if loss_design == "auto":
        return device.type == "cuda" and separable
    return loss_design == "one_pass"


def head_operands(causal_lm: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, the lm_head weight [V, D]) in one dtype and on one device, as the fused op takes them."""
    weight = output_weight(causal_lm)
    if weight.dtype != hidden.dtype:  # under autocast the backbone hands back bf16
        weight = weight.to(hidden.dtype)
    if weight.device != hidden.device:  # device_map: the backbone may end elsewhere than the head
        hidden = hidden.to(weight.device)
    return hidden, weight


def final_hidden_and_weight(causal_lm: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's last hidden states [R, L, D], the lm_head weight [V, D]) as head_operands
    gives them: what every route hands the fused op. inputs: the backbone's keyword arguments."""
    outputs = decoder(causal_lm)(**inputs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return head_operands(causal_lm, hidden)


def row_owner(targets: torch.Tensor) -> torch.Tensor:
    """[R, L]: the owner of each target when row r is example r (-1 where a position has no target)."""
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None]
    return torch.where(targets != IGNORE_INDEX, rows, -1)


def target_counts(owner: torch.Tensor, num_examples: int) -> torch.Tensor:
    """int64 [E]: each example's number of targets, from owner [R, L] (-1: none), without a sync."""
    counts = torch.zeros(num_examples, dtype=torch.long, device=owner.device)
    return counts.index_add(0, owner.clamp(min=0).flatten(), (owner >= 0).long().flatten())


def example_logprobs(
    hidden, weight, targets, owner=None, num_examples=None, *, impl="auto", filter_eps="auto", token_term=None
):
    """(logps [E] fp32, counts [E] int64, token_term's value or None): the summed target log-probs
    of each example, from hidden [R, L, D] and targets [R, L] (aligned_labels: IGNORE_INDEX where a
    position predicts nothing). owner [R, L]: the example of each target (-1 none), num_examples E;
    None: row r is example r (its log-probs summed along the row). token_term(token_logps, hidden,
    weight, targets, owner) -> tensor: a per-token term computed from the same token log-probs.
    The sums use no boolean indexing: no host sync beyond the fused op's own."""
    if owner is None:
        tokens = token_logprobs(hidden, weight, targets, impl=impl, filter_eps=filter_eps)
        logps, counts = tokens.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)
        owner = row_owner(targets)
    else:
        owned = torch.where(owner >= 0, targets, IGNORE_INDEX)
        tokens = token_logprobs(hidden, weight, owned, impl=impl, filter_eps=filter_eps)
        # Unowned positions add an exact 0.0 to example 0 (their token log-prob is 0).
        logps = tokens.new_zeros(num_examples).index_add(0, owner.clamp(min=0).flatten(), tokens.flatten())
        counts = target_counts(owner, num_examples)
    term = None if token_term is None else token_term(tokens, hidden, weight, targets, owner)
    return logps, counts, term


def one_pass_loss(
    hidden,
    weight,
    targets,
    owner,
    num_examples,
    sequence_loss,
    *,
    impl="auto",
    host_owner=None,
    upstream_is_one=False,
    token_level=False,
    token_values="logprob",
    groups=None,
):
    """sequence_loss(logps [E], counts [E]) -> scalar, a SUM OF PER-EXAMPLE TERMS, from ONE call of
    the one-pass design (ops.example_loss): the logits, the loss and both gradients chunk by chunk in
    this forward; the backward only scales them. Arguments as in example_logprobs (owner required);
    host_owner: the same owner on the host, so the op finds its rows and chunks without a sync.
    token_level: sequence_loss(logps, counts, per-token values [R, L]), a sum of per-example AND
    per-token terms (a token-weighted mean with detached weights); token_values: what those values
    are, "logprob" (the token log-probs) or "ce_u" (CE-U's per-token losses: ops.example_loss).
    groups: int64 [E] on the host, for a sum of per-GROUP terms (Method.example_groups: DPO's pairs):
    the chunks then hold whole groups (ops.example_loss)."""
    counts = target_counts(owner, num_examples)
    if token_level:

        def loss(logps, per_token):
            return sequence_loss(logps, counts, per_token.view(targets.shape))
    else:

        def loss(logps):
            return sequence_loss(logps, counts)

    with torch.autocast(hidden.device.type, enabled=False):  # the design picks its own precisions
        return example_loss(
            hidden.flatten(0, 1),
            weight,
            targets.flatten(),
            (owner if host_owner is None else host_owner).flatten(),
            num_examples,
            loss,
            impl=impl,
            design="one_pass",
            upstream_is_one=upstream_is_one,
            token_level=token_level,
            token_values=token_values,
            groups=groups,
        )


class SequenceLogprobModel(nn.Module):
    """forward(batch) -> (summed log-probs [E], target-token counts [E], extra) of each example: the
    one forward from a causal LM to per-example log-probs that the trainer, the reference pass and
    evaluation share (the HF patch runs the same example_logprobs / one_pass_loss on its hidden
    states).

    A batch is either padded (`input_ids`, `attention_mask`, `labels` [B, T]: E = B) or packed
    by data.collate_packed (`input_ids`, `position_ids`, `labels`, `segment_ids`, `index`:
    E = number of examples). Packed rows have no attention_mask: with use_cache=False,
    transformers builds the block-diagonal causal mask from the restarting position_ids.

    The fused op runs inside the ROOT module's forward: under FSDP2 the root's pre-forward hook
    gathers the lm_head weight, and its gradient is reduce-scattered like any other parameter.
    """

    def __init__(self, causal_lm: nn.Module, *, impl: str = "auto"):
        super().__init__()
        check_supported(causal_lm)
        output_weight(causal_lm)
        decoder(causal_lm)
        self.lm = causal_lm
        self.impl = impl

    def hidden_states(self, batch: dict) -> torch.Tensor:
        return self.hidden_and_weight(batch)[0]

    def hidden_and_weight(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return final_hidden_and_weight(self.lm, {**inputs, "use_cache": False})

    def forward(
        self,
        batch: dict,
        logits_rows: slice | None = None,
        token_term=None,
        sequence_loss=None,
        token_loss=None,
        token_values: str = "logprob",
        example_groups=None,
    ):
        """(logps [E], counts [E], extra); extra is, by what is asked:
        - logits_rows: the full [rows, T, V] fp32 logits of those rows of a padded batch (NPO+KL's KL term);
        - token_term(token_logps, hidden, weight, targets, owner) -> tensor: its value, computed from
          the same token log-probs (a method's per-token forget term); owner [R, L] is each target's
          example (-1 elsewhere);
        - else None.
        sequence_loss(logps [E], counts [E]) -> scalar, a sum of per-example terms: the call returns
        one_pass_loss's loss instead of the tuple. token_loss(logps [E], counts [E], token_logps [R, L])
        -> scalar, a sum of per-example and per-token terms: the same, token-level (token_values: what
        its per-token values are, one_pass_loss's). example_groups: one_pass_loss's groups (a sum of
        per-group terms, DPO's pairs). batch["target_owner"],
        target_owner(batch) on the host, lets it find its rows and chunks without a device sync."""
        hidden, weight = self.hidden_and_weight(batch)
        targets = aligned_labels(batch["labels"], True, IGNORE_INDEX)
        packed = "segment_ids" in batch
        examples = batch["index"].numel() if packed else hidden.shape[0]
        if sequence_loss is not None or token_loss is not None:
            return one_pass_loss(
                hidden,
                weight,
                targets,
                target_owner(batch),
                examples,
                sequence_loss if token_loss is None else token_loss,
                impl=self.impl,
                host_owner=batch.get("target_owner"),
                upstream_is_one=True,  # the trainer back-propagates this loss alone
                token_level=token_loss is not None,
                token_values=token_values,
                groups=example_groups,
            )
        owner = target_owner(batch) if packed or token_term is not None else None
        logps, counts, term = example_logprobs(
            hidden, weight, targets, owner, examples, impl=self.impl, token_term=token_term
        )
        if logits_rows is not None:
            return logps, counts, (hidden[logits_rows] @ weight.T).float()
        return logps, counts, term


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    strip: bool = True,
    decode=None,
    stopping_criteria=None,
    desc: str = "",
    progress: bool = False,
) -> list[str]:
    """Greedy answers to tokenized prompts, batched with left padding (pad token, else eos), decoded
    without special tokens. strip=False keeps surrounding whitespace (a caller that cuts at stop
    words first, as MUSE's evaluation does). decode(token ids) -> str replaces the default decoding;
    stopping_criteria(prompt_width) -> transformers.StoppingCriteriaList (or None) ends a batch early."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if decode is None:

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
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
            stopping_criteria=None if stopping_criteria is None else stopping_criteria(width),
        )
        texts += [decode(row) for row in generated[:, width:].tolist()]
    return [t.strip() for t in texts] if strip else texts
