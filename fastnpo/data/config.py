"""DataConfig: where the forget / retain sets come from and how they become batches."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass
class DataConfig:
    """Where the forget/retain sets come from and how they become batches.

    forget / retain: a local .json/.jsonl/.parquet file, a local directory holding
    ``<split>.jsonl|.json|.parquet``, or a hub dataset name such as "locuslab/TOFU" (the split
    is then the dataset's config name). retain = "" means no retain set.
    template: a format string with {question}, or "chat" for the tokenizer's chat template.
    idk_answers: a text file of refusals (one per line) for IdkDPO; "" = DEFAULT_IDK_ANSWERS.
    alternate: the forget questions' alternate answers (alternate preference optimization): a
    .json/.jsonl/.parquet file (or a directory holding ``<forget_split>.jsonl|.json|.parquet``)
    with ``question`` and ``alternate`` columns, matched to the forget set by question
    (fastnpo.data.make_alternates writes one); "" = the forget set's own ``alternate`` column.
    """

    forget: str = ""
    forget_split: str = "forget10"
    retain: str = ""
    retain_split: str = "retain90"
    template: str = "[INST] {question} [/INST]"
    answer_prefix: str = " "
    max_length: int = 256
    batch_size: int = 8
    retain_batch_size: int = 8
    packing: bool = False
    pack_tokens: int = 1024
    idk_answers: str = ""
    alternate: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "forget",
            "forget_split",
            "retain",
            "retain_split",
            "template",
            "answer_prefix",
            "idk_answers",
            "alternate",
        ):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"data.{name}: must be a string, got {getattr(self, name)!r}")
        for name, low in (("max_length", 2), ("batch_size", 1), ("retain_batch_size", 1), ("pack_tokens", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"data.{name}: must be an int >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"data.seed: must be a non-negative int, got {self.seed!r}")
        check_template(self.template)
        if self.packing and self.pack_tokens < self.max_length:
            # Otherwise a full-length example could never be placed in a row.
            raise ConfigError(
                f"data.pack_tokens: must be >= data.max_length ({self.max_length}) when packing, "
                f"got {self.pack_tokens}"
            )


def check_template(template: str) -> None:
    if template == "chat":
        return
    if "{question}" not in template:
        raise ValueError(f"template must contain {{question}} (or be 'chat'), got {template!r}")
    try:
        template.format(question="q")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"template {template!r} is not a valid format string with only {{question}} "
            f"(write literal braces as {{{{ and }}}}): {e!r}"
        ) from None
