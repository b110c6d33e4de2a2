"""Preference data (prompt, chosen, rejected) from files, folders or the hub.

Two public layouts are mapped onto ``prompt`` / ``chosen`` / ``rejected``:

* PKU-SafeRLHF: ``prompt``, ``response_0``, ``response_1`` and ``better_response_id`` and/or
  ``safer_response_id`` (0 or 1: which response is preferred);
* UltraFeedback (binarized) and most DPO sets: ``prompt``, ``chosen``, ``rejected``, where
  chosen / rejected are strings or chat transcripts (lists of ``{"role", "content"}``); the
  response is the last assistant turn and a missing prompt is the user turn before it.
"""

from __future__ import annotations

import datasets

from .sources import load_table

_PKU_KEYS = ("better_response_id", "safer_response_id")


def load_preference_data(source: str, split: str = "train", *, preference_key: str = "") -> datasets.Dataset:
    """A preference data set with string columns prompt / chosen / rejected.

    source: a .json/.jsonl/.parquet file, a directory holding ``<split>.jsonl|.json|.parquet``,
    or a hub name (``load_dataset(source, split=split)``; needs the network). preference_key
    picks PKU-SafeRLHF's label ("better_response_id" or "safer_response_id"; "" = the first
    present)."""
    data = load_table(source, split, what="preference data", hub_split_is_config=False)
    return normalize_preference(data, preference_key=preference_key, what=f"preference data {source!r}")


def _last_turn(value, role: str):
    """(content of the last `role` turn, content of the user turn before it) of a transcript."""
    turns = [t for t in value if isinstance(t, dict)]
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].get("role") == role:
            before = [t.get("content") for t in turns[:i] if t.get("role") == "user"]
            return turns[i].get("content"), (before[-1] if before else None)
    return None, None


def _response(value, where: str) -> tuple[str, str | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        content, prompt = _last_turn(value, "assistant")
        if isinstance(content, str):
            return content, prompt
    raise ValueError(f"{where}: expected a string or a chat transcript with an assistant turn, got {value!r:.80}")


def normalize_preference(data, *, preference_key: str = "", what: str = "preference data") -> datasets.Dataset:
    """Map PKU-SafeRLHF or chosen/rejected (string or chat) rows onto prompt / chosen / rejected."""
    columns = set(data.column_names)
    rows = []
    if {"response_0", "response_1"} <= columns:
        keys = [preference_key] if preference_key else [k for k in _PKU_KEYS if k in columns][:1]
        if not keys or keys[0] not in columns:
            raise ValueError(
                f"{what}: needs a {preference_key or ' or '.join(_PKU_KEYS)} column; columns: {sorted(columns)}"
            )
        for i, row in enumerate(data):
            better = row[keys[0]]
            if better not in (0, 1):
                raise ValueError(f"{what}: row {i}: {keys[0]} must be 0 or 1, got {better!r}")
            rows.append(
                {
                    "prompt": row["prompt"],
                    "chosen": row[f"response_{better}"],
                    "rejected": row[f"response_{1 - better}"],
                }
            )
    elif {"chosen", "rejected"} <= columns:
        for i, row in enumerate(data):
            chosen, prompt_c = _response(row["chosen"], f"{what}: row {i}: chosen")
            rejected, prompt_r = _response(row["rejected"], f"{what}: row {i}: rejected")
            prompt = row.get("prompt") or prompt_c or prompt_r
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    else:
        raise ValueError(
            f"{what}: unknown layout; need prompt/chosen/rejected or prompt/response_0/response_1/"
            f"better_response_id; columns: {sorted(columns)}"
        )
    for i, row in enumerate(rows):
        for key, value in row.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what}: row {i}: {key} must be a non-empty string, got {value!r:.80}")
    if not rows:
        raise ValueError(f"{what} is empty")
    return datasets.Dataset.from_list(rows)
