"""The cache object (RefLogprobs) and its file: safetensors, written atomically, checksummed, validated on load."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_write
from .fingerprint import _check_parts, _header, _tensor_digest, cache_key

logger = logging.getLogger(__name__)

FORMAT = "fastnpo-ref-logprobs"
FORMAT_VERSION = "1"
PREFIX = "reference log-probs:"

LogpsAndCounts = tuple[dict[str, Tensor], dict[str, Tensor]]


def _validate_sets(logps: Mapping[str, Tensor], counts: Mapping[str, Tensor]) -> None:
    if set(logps) != set(counts):
        raise ValueError(f"logps has sets {sorted(logps)} but counts has {sorted(counts)}")
    if not logps:
        raise ValueError("no sets: logps and counts are empty")
    for s in logps:
        lp, ct = logps[s], counts[s]
        if not isinstance(s, str) or not s:
            raise ValueError(f"set names must be non-empty strings, got {s!r}")
        if not isinstance(lp, Tensor) or lp.dtype != torch.float32 or lp.dim() != 1:
            raise ValueError(f"set {s!r}: logps must be a 1-D float32 tensor, got {_describe(lp)}")
        if not isinstance(ct, Tensor) or ct.dtype != torch.int64 or ct.shape != lp.shape:
            raise ValueError(
                f"set {s!r}: counts must be int64 of shape {tuple(lp.shape)}, got {_describe(ct)}"
            )
        bad = ~torch.isfinite(lp)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(
                f"set {s!r}: logps has {int(bad.sum())} NaN/inf value(s) "
                f"(first at index {first}: {float(lp[first])})"
            )
        if bool((ct < 0).any()):
            raise ValueError(f"set {s!r}: counts has negative values")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


@dataclass
class RefLogprobs:
    """Per-set reference log-probs: ``logps[set]`` fp32 [n] and ``counts[set]`` int64 [n], row = index."""

    logps: dict[str, Tensor]
    counts: dict[str, Tensor]
    key: str
    parts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate_sets(self.logps, self.counts)

    @property
    def sets(self) -> tuple[str, ...]:
        return tuple(sorted(self.logps))

    def num_examples(self, set_name: str) -> int:
        return int(self._set(set_name).shape[0])

    def summary(self) -> str:
        return ", ".join(f"{s}: {self.num_examples(s)}" for s in self.sets)

    def _set(self, set_name: str) -> Tensor:
        if set_name not in self.logps:
            raise KeyError(f"unknown set {set_name!r}; the reference cache holds: {', '.join(self.sets)}")
        return self.logps[set_name]

    def lookup(self, set_name: str, index) -> tuple[Tensor, Tensor]:
        """(logps fp32, counts int64) of the examples ``index`` (any shape), on ``index``'s device."""
        table = self._set(set_name)
        idx = index if isinstance(index, Tensor) else torch.as_tensor(index)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got {idx.dtype}")
        n = table.shape[0]
        local = idx.to(table.device, torch.int64)
        if local.numel():
            outside = (local < 0) | (local >= n)
            if bool(outside.any()):
                raise IndexError(
                    f"index {int(local[outside][0])} out of range for set {set_name!r} with {n} examples"
                )
        out = idx.device if isinstance(index, Tensor) else table.device
        return table[local].to(out), self.counts[set_name][local].to(out)


def _payload_checksum(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256(b"fastnpo-ref-logprobs-payload-v1\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(_header(name, str(t.dtype), list(t.shape)))
        h.update(_tensor_digest(t))
    return h.hexdigest()


def _serialize(tensors: Mapping[str, Tensor], key: str, parts: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    sets = sorted({k.rsplit("/", 1)[0] for k in tensors})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "parts": json.dumps(dict(parts), sort_keys=True, ensure_ascii=False),
        "sets": json.dumps(sets),
        "checksum": _payload_checksum(tensors),
    }
    return save(tensors, metadata=metadata)


def save_ref_logprobs(path, ref: RefLogprobs) -> Path:
    """Write ``ref`` atomically as safetensors (``{set}/logps``, ``{set}/counts``) with its key, parts,
    format version and a sha256 checksum of the tensors in the metadata. Returns the path."""
    if not isinstance(ref, RefLogprobs):
        raise TypeError(f"ref must be a RefLogprobs, got {type(ref).__name__}")
    _validate_sets(ref.logps, ref.counts)
    if ref.key != cache_key(**ref.parts):
        raise ValueError("ref.key is not cache_key(**ref.parts): a file written so could never be loaded")
    tensors: dict[str, Tensor] = {}
    for s in ref.sets:
        tensors[f"{s}/logps"] = ref.logps[s]
        tensors[f"{s}/counts"] = ref.counts[s]
    path = Path(path)
    atomic_write(path, _serialize(tensors, ref.key, ref.parts))
    return path


def _short(value: str) -> str:
    return value if len(value) <= 16 else value[:12] + "…"


def _diff_parts(stored: Mapping[str, str], expected: Mapping[str, str]) -> str:
    out = [
        f"{k} (cached {_short(stored[k])}, now {_short(expected[k])})"
        for k in sorted(set(stored) & set(expected))
        if stored[k] != expected[k]
    ]
    out += [f"{k} (only in the cached key)" for k in sorted(set(stored) - set(expected))]
    out += [f"{k} (not in the cached key)" for k in sorted(set(expected) - set(stored))]
    return ", ".join(out)


# safetensors' own header errors that mean the file ends early (or, for the last, that its size
# does not match the header: truncation is the case a partial copy produces).
_TRUNCATED = ("header too small", "invalid header length", "incomplete metadata")


def _open(path: Path) -> tuple[dict[str, str], dict[str, Tensor]] | str:
    """(metadata, tensors) of the safetensors file, or why it cannot be read. One open file, so
    metadata and tensors come from the same version even if another rank replaces the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # get_tensor maps the file: a copy keeps the cache valid (no SIGBUS) if the file is
            # later truncated or rewritten in place.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e})"
    except SafetensorError as e:
        if any(what in str(e) for what in _TRUNCATED):
            return f"truncated ({_size(path)} bytes: {e})"
        return f"corrupt header ({e})"
    return meta, tensors


def _size(path: Path) -> str:
    try:
        return str(path.stat().st_size)
    except OSError:
        return "?"


def _read(
    path: Path, expected_key: str, expected_parts: Mapping[str, str] | None
) -> tuple[RefLogprobs | None, str]:
    """(cache, "") or (None, why not)."""
    opened = _open(path)
    if isinstance(opened, str):
        return None, opened
    meta, tensors = opened
    if meta.get("format") != FORMAT:
        return None, f"not a reference log-prob file (format {meta.get('format')!r})"
    if meta.get("format_version") != FORMAT_VERSION:
        return None, f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}"
    try:
        parts = json.loads(meta["parts"])
        sets = json.loads(meta["sets"])
        stored_key, checksum = meta["key"], meta["checksum"]
        _check_parts(parts)
    except (ValueError, TypeError, KeyError) as e:
        return None, f"corrupt metadata ({e})"
    if stored_key != expected_key:
        if expected_parts is not None:
            return None, f"key mismatch: {_diff_parts(parts, expected_parts) or 'parts equal, key differs'}"
        return None, f"key mismatch (cached {_short(stored_key)}, expected {_short(expected_key)})"
    if cache_key(**parts) != stored_key:
        return None, "corrupt metadata (the stored parts do not hash to the stored key)"
    if _payload_checksum(tensors) != checksum:
        return None, "corrupt (checksum mismatch)"
    expected_names = {f"{s}/{kind}" for s in sets for kind in ("logps", "counts")}
    if set(tensors) != expected_names:
        return None, f"corrupt (tensors {sorted(tensors)} do not match sets {sets})"
    try:
        ref = RefLogprobs(
            logps={s: tensors[f"{s}/logps"] for s in sets},
            counts={s: tensors[f"{s}/counts"] for s in sets},
            key=stored_key,
            parts=parts,
        )
    except ValueError as e:
        return None, f"invalid contents ({e})"
    return ref, ""


def load_ref_logprobs(
    path,
    expected_key: str,
    *,
    expected_parts: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> RefLogprobs | None:
    """The cache at ``path`` if it is intact and was built for ``expected_key``; else None.

    Every failure is reported through ``log`` (default: the module logger; a missing file at info
    level, the rest as warnings): missing, truncated, unreadable, corrupt (checksum mismatch or a
    safetensors error), wrong format version, key mismatch (naming the differing parts when
    ``expected_parts`` is given), NaN/inf values. Bad data is never returned.
    """
    path = Path(path)
    ref, reason = _read(path, expected_key, expected_parts)
    if ref is None:
        message = f"{PREFIX} not using {path}: {reason}"
        if log is not None:
            log(message)
        elif reason == "missing":
            logger.info(message)
        else:
            logger.warning(message)
    return ref


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"ref-logprobs-{key[:16]}.safetensors"


def _normalize(result, key: str, parts: Mapping[str, str]) -> RefLogprobs:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"compute() must return (logps: dict, counts: dict), got {type(result).__name__}")
    logps, counts = result
    if not isinstance(logps, Mapping) or not isinstance(counts, Mapping):
        raise TypeError("compute() must return two dicts set name -> tensor")
    for s, ct in counts.items():
        if isinstance(ct, Tensor) and (ct.dtype.is_floating_point or ct.dtype.is_complex):
            raise TypeError(f"compute(): counts[{s!r}] must be an integer tensor, got {ct.dtype}")
    lp = {s: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous() for s, v in logps.items()}
    ct = {s: torch.as_tensor(v).detach().to("cpu", torch.int64).contiguous() for s, v in counts.items()}
    declared = {k.split("/", 1)[1] for k in parts if k.startswith("examples/")}
    if declared and declared != set(lp):
        raise ValueError(
            f"compute() returned sets {sorted(lp)} but parts fingerprint the examples of {sorted(declared)}"
        )
    try:
        return RefLogprobs(logps=lp, counts=ct, key=key, parts=dict(parts))
    except ValueError as e:
        raise ValueError(f"compute() returned unusable reference log-probs: {e}") from e
