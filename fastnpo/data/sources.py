"""Loading TOFU-schema splits (files, folders, hub) and the IdkDPO refusals."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

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


def local_file(source: str, split: str, *, what: str = "data set") -> Path | None:
    """The file a local source names for ``split`` (the file itself, or ``<split>.jsonl`` /
    ``.json`` / ``.parquet`` in a directory); None for a hub name. Raises FileNotFoundError for
    a path that does not exist, ValueError for an unsupported suffix."""
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
        if path.suffix.lower() not in _LOCAL_SUFFIXES:
            raise ValueError(
                f"{what}: file {str(path)!r} must end in one of {sorted(_LOCAL_SUFFIXES)}, "
                f"got {path.suffix!r}"
            )
        return path
    if _looks_local(source):
        raise FileNotFoundError(f"{what}: no such file or directory: {source!r}")
    return None


def describe_source(source: str, split: str, *, what: str = "data set") -> str:
    """How messages name a set: "<what> <file>" for a local source, else the hub name and split."""
    path = local_file(source, split, what=what)
    return f"{what} {str(path)!r}" if path is not None else f"{what} {source!r} (split {split!r})"


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
    path = local_file(source, split, what=what)
    if path is not None:
        builder = _LOCAL_SUFFIXES[path.suffix.lower()]
        # datasets fails on an empty file with "Instruction 'train' corresponds to no data".
        if _local_file_is_empty(path, builder):
            raise ValueError(f"{what} {str(path)!r} is empty")
        try:
            # The packaged reader directly: load_dataset would first ping the hub to count the load
            # (an HTTP HEAD even for a local file, a stall of seconds where there is no network).
            read = datasets.Dataset.from_json if builder == "json" else datasets.Dataset.from_parquet
            return read(str(path))
        except DatasetGenerationError as error:
            # datasets names the bad row only in a log line; find it and say it in the error.
            raise ValueError(f"{what} {str(path)!r}: {_json_problem(path, builder, error)}") from None
    if not hub_split_is_config:
        return datasets.load_dataset(source, split=split)
    data = datasets.load_dataset(source, split, split="train")
    return data["train"] if isinstance(data, datasets.DatasetDict) else data


def _json_problem(path: Path, builder: str, error: Exception) -> str:
    """The first line of a JSON / JSON-lines file that does not parse or is not an object."""
    cause = error.__cause__ or error.__context__ or error
    if builder != "json":
        return f"cannot be read ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document, not JSON lines
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            return f"line {bad.lineno}, column {bad.colno}: not valid JSON ({bad.msg})"
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"line {number}, column {bad.colno}: not valid JSON ({bad.msg})"
            if not isinstance(row, dict):
                return f"line {number}: not a JSON object (got {type(row).__name__})"
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return f"cannot be read as a table of rows with the same columns and types ({first})"


def load_qa_split(source: str, split: str, *, what: str = "data set") -> datasets.Dataset:
    """Load one TOFU-schema split (columns ``question`` and ``answer``): see load_table; TOFU
    keeps each split as a hub config."""
    data = load_table(source, split, what=what)
    name = describe_source(source, split, what=what)
    for column in REQUIRED_COLUMNS:
        if column not in data.column_names:
            raise ValueError(f"{name} has no {column!r} column; columns: {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
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
