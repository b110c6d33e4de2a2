"""Loading TOFU-schema splits (files, folders, hub) and the IdkDPO refusals."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import datasets

from .config import DataConfig

REQUIRED_COLUMNS = ("question", "answer")
_LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

DEFAULT_IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I don't have that information.",
    "I'm afraid I can't answer that.",
    "That's something I don't know.",
    "I'm not able to answer that question.",
    "I don't have any knowledge about that.",
    "Sorry, I don't know the answer to that.",
    "I can't help with that question.",
    "I'm unaware of the answer.",
    "That is beyond my knowledge.",
    "I have no information on that topic.",
    "I really couldn't say.",
    "I'm not familiar with that.",
    "I don't know anything about that.",
    "Unfortunately, I don't have an answer.",
    "I'm unable to provide that information.",
    "That's not something I can answer.",
    "I honestly don't know.",
)


def _looks_local(source: str) -> bool:
    # A hub name is "owner/name"; anything path-like that does not exist is a missing local file,
    # which deserves a FileNotFoundError rather than a confusing hub lookup.
    return (
        source.startswith((".", "/", "~")) or "\\" in source or Path(source).suffix.lower() in _LOCAL_SUFFIXES
    )


def _local_file_is_empty(path: Path, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.strip() in (b"", b"[]")


def load_table(source: str, split: str, *, what: str = "data set", hub_split_is_config: bool = True):
    """One split of a data set through ``datasets``: a .json/.jsonl/.parquet file (split is
    ignored), a directory holding ``<split>.jsonl``, ``<split>.json`` or ``<split>.parquet``, or a
    hub name, loaded as ``load_dataset(source, split)["train"]`` when the hub set keeps each split
    as a config (TOFU), else as ``load_dataset(source, split=split)``.
    what: how error messages name the set, e.g. "forget set"."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{what}: source must be a non-empty path or hub dataset name, got {source!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"{what}: split must be a non-empty string, got {split!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in (".jsonl", ".json", ".parquet")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{what}: directory {source!r} holds none of {[c.name for c in candidates]}"
            )
        path = found[0]
    if path.is_file():
        builder = _LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{what}: file {str(path)!r} must end in one of {sorted(_LOCAL_SUFFIXES)}, "
                f"got {path.suffix!r}"
            )
        # datasets fails on an empty file with "Instruction 'train' corresponds to no data".
        if _local_file_is_empty(path, builder):
            raise ValueError(f"{what} {source!r} (split {split!r}) is empty")
        return datasets.load_dataset(builder, data_files=str(path))["train"]
    if _looks_local(source):
        raise FileNotFoundError(f"{what}: no such file or directory: {source!r}")
    if not hub_split_is_config:
        return datasets.load_dataset(source, split=split)
    data = datasets.load_dataset(source, split, split="train")
    return data["train"] if isinstance(data, datasets.DatasetDict) else data


def load_qa_split(source: str, split: str, *, what: str = "data set") -> datasets.Dataset:
    """Load one TOFU-schema split (columns ``question`` and ``answer``): see load_table; TOFU
    keeps each split as a hub config."""
    data = load_table(source, split, what=what)
    for column in REQUIRED_COLUMNS:
        if column not in data.column_names:
            raise ValueError(
                f"{what} {source!r} (split {split!r}) has no {column!r} column; columns: {data.column_names}"
            )
    if len(data) == 0:
        raise ValueError(f"{what} {source!r} (split {split!r}) is empty")
    return data


def idk_answers(config: DataConfig) -> list[str]:
    """Refusals for IdkDPO: config.idk_answers's non-empty lines, or DEFAULT_IDK_ANSWERS."""
    if not config.idk_answers:
        return list(DEFAULT_IDK_ANSWERS)
    path = Path(config.idk_answers).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"idk_answers file not found: {config.idk_answers!r}")
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"idk_answers file {config.idk_answers!r} has no non-empty line")
    return answers


def add_idk_answers(dataset, answers: Sequence[str], *, seed: int = 0, column: str = "idk_answer"):
    """dataset plus a column with, for row i, a refusal chosen by a stable hash of (seed, i)."""
    if not answers:
        raise ValueError("answers must hold at least one refusal")
    if column in dataset.column_names:
        raise ValueError(f"dataset already has a {column!r} column")
    picks = [answers[zlib.crc32(f"{seed}:{i}".encode()) % len(answers)] for i in range(len(dataset))]
    return dataset.add_column(column, picks)
