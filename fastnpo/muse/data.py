"""MUSE's data layout, from the hub or from a local folder laid out the same way.

The hub sets (muse-bench/MUSE-News, muse-bench/MUSE-Books) keep each part as a config and each
set as a split of it, loaded with ``datasets.load_dataset(path, name, split=split)``; a local
layout is a folder holding one folder per config and one ``<split>.jsonl`` (or .json / .parquet)
per split, as ``fastnpo.muse.minimuse.write_minimuse`` writes it:

    raw       forget, retain1, retain2, holdout          text
    verbmem   forget                                     prompt, gt
    knowmem   forget_qa, forget_qa_icl, retain_qa, retain_qa_icl   question, answer
    privleak  forget, holdout, retain                    text

(open-unlearning's configs/data/datasets/MUSE_*.yaml name the same configs, splits and columns.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from ..data.sources import load_table

HUB_NAMES = ("muse-bench/MUSE-News", "muse-bench/MUSE-Books")
COLUMNS = {
    "raw": ("text",),
    "verbmem": ("prompt", "gt"),
    "knowmem": ("question", "answer"),
    "privleak": ("text",),
}
SPLITS = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl"),
    "privleak": ("forget", "holdout", "retain"),
}


def is_local(layout: str) -> bool:
    """A folder on disk (rather than a hub name such as muse-bench/MUSE-News)."""
    return Path(layout).expanduser().is_dir()


def _check_layout(layout) -> str:
    if not isinstance(layout, (str, Path)) or not str(layout):
        raise ValueError(f"layout must be a MUSE hub name {HUB_NAMES} or a local folder, got {layout!r}")
    layout = str(layout)
    if not is_local(layout) and (layout.startswith((".", "/", "~")) or layout.count("/") != 1 or Path(layout).suffix):
        raise FileNotFoundError(f"layout {layout!r}: no such folder (and not a hub name owner/name)")
    return layout


def load_split(layout: str | Path, config: str, split: str, *, max_rows: int | None = None) -> datasets.Dataset:
    """One split of one MUSE config, with its columns checked (ValueError naming the split and the
    missing column; FileNotFoundError naming a missing local split file)."""
    layout = _check_layout(layout)
    if config not in COLUMNS:
        raise ValueError(f"config must be one of {sorted(COLUMNS)}, got {config!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    what = f"MUSE {config}/{split}"
    if is_local(layout):
        folder = Path(layout).expanduser() / config
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: layout {layout!r} has no {config!r} folder")
        try:
            rows = load_table(str(folder), split, what=what)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{what}: missing split {split!r} in {str(folder)!r} ({error})") from None
    else:
        try:
            rows = datasets.load_dataset(layout, config, split=split)
        except (ValueError, FileNotFoundError, ConnectionError, OSError) as error:
            # The same kind of error (a library subclass may need other arguments: its base then).
            kind = next(k for k in (ConnectionError, FileNotFoundError, ValueError, OSError) if isinstance(error, k))
            message = f"{what}: cannot load split {split!r} of config {config!r} from {layout!r}: {error}"
            raise kind(message) from error
    missing = [c for c in COLUMNS[config] if c not in rows.column_names]
    if missing:
        raise ValueError(f"{what} ({layout}) has no {missing[0]!r} column; columns: {rows.column_names}")
    if len(rows) == 0:
        raise ValueError(f"{what} ({layout}) is empty")
    for column in COLUMNS[config]:
        bad = [i for i, v in enumerate(rows[column]) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{what} ({layout}): {column!r} of row {bad[0]} is not a string: {rows[bad[0]][column]!r}")
    if max_rows is not None:
        if type(max_rows) is not int or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        rows = rows.select(range(min(len(rows), max_rows)))
    return rows


@dataclass
class MuseData:
    """What the MUSE evaluation reads: verbmem prompts and gold continuations, knowmem QA with
    their few-shot examples, privleak's forget and holdout texts (None when not loaded)."""

    layout: str
    verbmem: datasets.Dataset
    forget_qa: datasets.Dataset
    forget_qa_icl: datasets.Dataset
    retain_qa: datasets.Dataset
    retain_qa_icl: datasets.Dataset
    privleak_forget: datasets.Dataset | None = None
    privleak_holdout: datasets.Dataset | None = None


def load_muse(
    layout: str | Path,
    *,
    max_examples: int | None = None,
    privacy: bool = True,
    forget_qa_split: str = "forget_qa",
    retain_qa_split: str = "retain_qa",
) -> MuseData:
    """The evaluation sets of a MUSE layout (hub name or local folder). max_examples caps every set
    but the few-shot ones (None: all, as open-unlearning). The few-shot splits are
    <forget_qa_split>_icl and <retain_qa_split>_icl."""
    layout = _check_layout(layout)
    return MuseData(
        layout=layout,
        verbmem=load_split(layout, "verbmem", "forget", max_rows=max_examples),
        forget_qa=load_split(layout, "knowmem", forget_qa_split, max_rows=max_examples),
        forget_qa_icl=load_split(layout, "knowmem", f"{forget_qa_split}_icl"),
        retain_qa=load_split(layout, "knowmem", retain_qa_split, max_rows=max_examples),
        retain_qa_icl=load_split(layout, "knowmem", f"{retain_qa_split}_icl"),
        privleak_forget=load_split(layout, "privleak", "forget", max_rows=max_examples) if privacy else None,
        privleak_holdout=load_split(layout, "privleak", "holdout", max_rows=max_examples) if privacy else None,
    )


def raw_texts(layout: str | Path, split: str) -> list[str]:
    """The articles (or book chunks) of raw/<split>: forget, retain1, retain2 or holdout."""
    return list(load_split(layout, "raw", split)["text"])


def trainer_rows(texts: list[str]) -> list[dict]:
    """Raw texts as the trainer's rows: {"question": "", "answer": text}. With data.template="{question}"
    and data.answer_prefix="" the trainer's loss covers every token of the text after <bos>, and the
    <eos> it appends (open-unlearning's PretrainingDataset adds none and chunks the joined text)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    return [{"question": "", "answer": t} for t in texts]


def write_trainer_rows(layout: str | Path, out_dir: str | Path, splits=("forget", "retain1")) -> Path:
    """raw/<split> of a layout as the trainer's rows, <out_dir>/<split>.jsonl (trainer_rows), so that
    `fastnpo train data.forget=<out_dir> data.forget_split=forget data.retain=<out_dir>
    data.retain_split=retain1 data.template='{question}' data.answer_prefix=""` unlearns MUSE's forget
    texts. Each text is one row, truncated by data.max_length (open-unlearning instead cuts the
    joined texts into 2048-token chunks)."""
    import json

    from ..files import atomic_write

    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty list of raw splits, got {splits!r}")
    out = Path(out_dir)
    for split in splits:
        rows = trainer_rows(raw_texts(layout, split))
        atomic_write(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return out
