"""Reference log-prob cache: the frozen initial model's per-sequence log-probs, computed once.

NPO, DPO/IdkDPO and friends compare the trained model's log-probs with those of the frozen initial
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

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import struct
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

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
    "load_ref_logprobs",
    "ref_cache_parts",
    "save_ref_logprobs",
    "verify_ref_logprobs",
]

logger = logging.getLogger(__name__)

FORMAT = "fastnpo-ref-logprobs"
FORMAT_VERSION = "1"
PREFIX = "reference log-probs:"
_CHUNK_BYTES = 64 << 20  # device -> CPU copies and hash updates per tensor go in pieces of this size

LogpsAndCounts = tuple[dict[str, Tensor], dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _tensor_digest(t: Tensor) -> bytes:
    """sha256 of a tensor's raw bytes (C order), copied to CPU in _CHUNK_BYTES pieces."""
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    h = hashlib.sha256()
    step = max(1, _CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        if piece.device.type != "cpu":
            piece = piece.to("cpu")
        # Viewing as bytes handles every dtype numpy lacks (bf16, fp8) without a conversion.
        h.update(piece.view(torch.uint8).numpy())
    return h.digest()


def _header(*fields) -> bytes:
    blob = json.dumps(fields, separators=(",", ":")).encode()
    return struct.pack("<Q", len(blob)) + blob


def fingerprint_model(model: torch.nn.Module, *, workers: int | None = None) -> str:
    """sha256-based hex fingerprint of every parameter and buffer: name, shape, dtype and raw bytes.

    Entries are visited in ``state_dict`` order, followed by the non-persistent buffers (e.g. rotary
    ``inv_freq``, which depends on config values that no weight records). Tied weights are hashed once
    (the second name is recorded as an alias). Each tensor is copied to CPU in 64 MiB pieces, so a
    model on GPU never needs a second full copy in host memory; bf16/fp8 are hashed through a byte
    view. Per-tensor digests are computed on ``workers`` threads (default min(8, CPUs); hashlib
    releases the GIL) and combined in order, so the result does not depend on ``workers``.

    Speed: sha256 of the raw bytes is the bound. Measured on this project's CPU machine (2 vCPU
    Intel Xeon @ 2.5 GHz, no SHA extensions, Python's hashlib/OpenSSL): ~250 MB/s for a 100 MB fp32
    model already in memory, i.e. ~4 s per GB (a 7B bf16 model, 13.5 GB: about a minute). A 2-vCPU
    machine gains nothing from threads; more cores (and SHA-NI CPUs, several GB/s per core) scale it.
    Fingerprint the model once per run, before unlearning changes it.

    FSDP2-sharded parameters (DTensor) are gathered one at a time with ``full_tensor()``, a
    collective: every rank must then call this function. Fingerprinting before sharding is cheaper.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    entries: list[tuple[str, Tensor]] = list(model.state_dict(keep_vars=True).items())
    seen = {name for name, _ in entries}
    entries += [(name, buf) for name, buf in model.named_buffers() if name not in seen and buf is not None]
    workers = workers or min(8, os.cpu_count() or 1)

    outer = hashlib.sha256(b"fastnpo-model-fingerprint-v1\0")
    aliases: dict[tuple, str] = {}
    pending: deque = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            head, future = pending.popleft()
            outer.update(head)
            outer.update(future.result() if hasattr(future, "result") else future)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, t in entries:
            if not isinstance(t, Tensor):  # e.g. extra state stored in the state dict
                pending.append((_header(name, "object", repr(t)), b""))
                continue
            if hasattr(t, "full_tensor"):
                # DTensor (FSDP2): tied parameters are one object; decide aliasing by identity, the same
                # way on every rank, before the collective gather of this one parameter.
                ident = ("dtensor", id(t))
                if ident not in aliases:
                    t = t.full_tensor()
            elif t.is_meta:
                raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (not materialised)")
            else:
                storage = (t.untyped_storage().data_ptr(), t.storage_offset(), t.stride())
                ident = (t.device, *storage, tuple(t.shape), t.dtype) if t.numel() else None
            head = _header(name, list(t.shape), str(t.dtype))
            if ident is not None and ident in aliases:
                pending.append((head, b"alias-of:" + aliases[ident].encode()))
                continue
            if ident is not None:
                aliases[ident] = name
            pending.append((head, pool.submit(_tensor_digest, t)))
            drain(2 * workers)  # bounds host copies (and gathered DTensors) in flight
        drain(0)
    return outer.hexdigest()


# Config fields that do not change what the model computes (names, versions, runtime flags).
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)


def fingerprint_config(config) -> str:
    """Fingerprint of a model config (a ``PretrainedConfig``, a model with ``.config``, or a dict).

    Weights do not record everything the forward depends on (rms_norm_eps, rope scaling, logit
    soft-capping, the attention implementation): add this as a ``config`` part. Paths, versions and
    runtime flags are left out so that the same model loaded from elsewhere keeps its key.
    """
    if isinstance(config, torch.nn.Module):
        config = getattr(config, "config", None)
        if config is None:
            raise ValueError("model has no .config to fingerprint")
    d = dict(config) if isinstance(config, Mapping) else config.to_dict()
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        d["_attn_implementation"] = impl
    blob = json.dumps(d, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(b"fastnpo-config-fingerprint-v1\0" + blob).hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """Fingerprint of a tokenizer: its serialized form, special tokens and chat template.

    Fast tokenizers (and raw ``tokenizers.Tokenizer`` objects) are hashed through ``to_str()``, minus
    the truncation/padding state that encoding calls leave behind (it changes between calls and does
    not change the vocabulary or the merges); others through ``get_vocab()`` sorted.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    if backend is not None:
        serialized = json.loads(backend.to_str())
        serialized.pop("truncation", None)
        serialized.pop("padding", None)
        body = {"tokenizer": serialized}
    elif hasattr(tokenizer, "get_vocab"):
        body = {"vocab": sorted(tokenizer.get_vocab().items())}
    else:
        raise TypeError(
            f"cannot fingerprint a {type(tokenizer).__name__}: no backend_tokenizer or get_vocab()"
        )
    if tokenizer is not backend:
        body["special_tokens"] = list(
            zip(
                getattr(tokenizer, "all_special_tokens", []),
                getattr(tokenizer, "all_special_ids", []),
                strict=False,
            )
        )
        body["special_tokens_map"] = getattr(tokenizer, "special_tokens_map", None)
        body["chat_template"] = getattr(tokenizer, "chat_template", None)
    blob = json.dumps(body, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(b"fastnpo-tokenizer-fingerprint-v1\0" + blob).hexdigest()


_EXAMPLE_KEYS = ("input_ids", "labels")
_OPTIONAL_EXAMPLE_KEYS = ("attention_mask", "position_ids")


def _int_tensor(name: str, value) -> Tensor:
    t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to("cpu", torch.int64).contiguous()


def fingerprint_examples(items: Sequence[Mapping]) -> str:
    """Fingerprint of the tokenized examples actually used: ``index``, ``input_ids``, ``labels``.

    Token ids and labels cover the dataset content, the prompt template, the answer prefix, the masking
    and the max length at once. ``attention_mask`` / ``position_ids`` are included when present.
    Order-independent (sorted by ``index``, which is what the cache is indexed by); duplicate indices
    are an error.
    """
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a sequence of dicts, got {type(items).__name__}")
    keyed: dict[int, Mapping] = {}
    for pos, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"items[{pos}] must be a dict, got {type(item).__name__}")
        for k in ("index", *_EXAMPLE_KEYS):
            if k not in item:
                raise ValueError(f"items[{pos}] has no {k!r}")
        try:
            index = operator.index(item["index"])
        except TypeError:
            raise TypeError(f"items[{pos}]['index'] must be an int, got {item['index']!r}") from None
        if index < 0:
            raise ValueError(f"items[{pos}] has a negative index {index}")
        if index in keyed:
            raise ValueError(f"index {index} appears twice (items[{pos}])")
        keyed[index] = item
    h = hashlib.sha256(b"fastnpo-examples-fingerprint-v1\0")
    h.update(struct.pack("<Q", len(keyed)))
    for index in sorted(keyed):
        item = keyed[index]
        h.update(struct.pack("<q", index))
        for k in (*_EXAMPLE_KEYS, *(k for k in _OPTIONAL_EXAMPLE_KEYS if item.get(k) is not None)):
            t = _int_tensor(f"example {index} {k}", item[k])
            h.update(_header(k, list(t.shape)))
            h.update(t.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def cache_key(**parts: str) -> str:
    """Deterministic sha256 hex key over named string parts (sorted by name)."""
    _check_parts(parts)
    blob = json.dumps(sorted(parts.items()), separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(b"fastnpo-refcache-key-v1\0" + blob).hexdigest()


def _check_parts(parts: Mapping) -> None:
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError("parts must be a non-empty dict of name -> str")
    for name, value in parts.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"part names must be non-empty strings, got {name!r}")
        if not isinstance(value, str):
            raise TypeError(
                f"part {name!r} must be a str, got {type(value).__name__} (convert it explicitly)"
            )


def _part_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, torch.dtype)) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def ref_cache_parts(
    *, model: torch.nn.Module, tokenizer=None, examples: Mapping[str, Sequence[Mapping]], **extra
) -> dict[str, str]:
    """The standard key parts: ``model``, ``config`` (if the model has one), ``tokenizer`` (if given),
    ``sets``, ``examples/<set>`` for every set, plus ``extra`` (template, max_length, dtype, ...;
    non-strings are converted with str / JSON)."""
    parts = {"model": fingerprint_model(model), "sets": json.dumps(sorted(examples))}
    if getattr(model, "config", None) is not None:
        parts["config"] = fingerprint_config(model.config)
    if tokenizer is not None:
        parts["tokenizer"] = fingerprint_tokenizer(tokenizer)
    for name, items in examples.items():
        parts[f"examples/{name}"] = fingerprint_examples(items)
    for name, value in extra.items():
        parts[name] = _part_str(value)
    return parts


# ----------------------------------------------------------------------------------------------
# The cache object
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# File format: safetensors, atomic writes, checksummed, validated on load
# ----------------------------------------------------------------------------------------------


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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + os.replace: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache dir may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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
    _atomic_write(path, _serialize(tensors, ref.key, ref.parts))
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


def _read(
    path: Path, expected_key: str, expected_parts: Mapping[str, str] | None
) -> tuple[RefLogprobs | None, str]:
    """(cache, "") or (None, why not)."""
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e})"
    if len(data) < 8:
        return None, f"truncated ({len(data)} bytes)"
    n = struct.unpack("<Q", data[:8])[0]
    if 8 + n > len(data):
        return None, f"truncated (header of {n} bytes, file of {len(data)})"
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return None, f"corrupt header ({e})"
    if 8 + n + end > len(data):
        return None, f"truncated ({len(data)} of {8 + n + end} bytes)"
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
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type
        return None, f"corrupt ({type(e).__name__}: {e})"
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


# ----------------------------------------------------------------------------------------------
# Build or load
# ----------------------------------------------------------------------------------------------


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


def get_or_build_ref_logprobs(
    cache_dir,
    parts: dict[str, str],
    compute: Callable[[], LogpsAndCounts],
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    all_agree: Callable[[bool], bool] | None = None,
) -> tuple[RefLogprobs, bool]:
    """Load the cache for ``parts`` from ``cache_dir``, or compute, store and reload it. Returns (cache, hit).

    Hit: every rank loads ``ref-logprobs-<key[:16]>.safetensors`` and logs it. Miss (or a bad file):
    every rank calls ``compute()`` (which may itself be collective: e.g. each rank computes a shard
    and all-gathers), rank 0 writes the file atomically, all ranks meet at ``barrier()``, and every
    rank loads what rank 0 wrote (verifying the key), so all ranks train on identical numbers.

    Several ranks need a shared ``cache_dir`` and a ``barrier``. They must also agree on hit or miss,
    or a collective ``compute`` would hang on the ranks that call it; on a shared filesystem they
    normally do, and ``all_agree(local_hit) -> bool`` (e.g. an all-reduce MIN of the flag) makes it
    certain. If rank 0 cannot write the file, or another rank cannot read it back, that rank goes on
    with its own computed values and says so.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if world_size > 1 and barrier is None:
        raise ValueError("barrier is required when world_size > 1 (rank 0 writes, the others wait for it)")
    if not callable(compute):
        raise TypeError("compute must be a callable returning (logps, counts)")
    parts = dict(parts)
    key = cache_key(**parts)
    path = cache_path(cache_dir, key)
    who = f" [rank {rank}]" if world_size > 1 else ""

    ref, reason = _read(path, key, parts)
    hit = ref is not None
    if world_size > 1 and all_agree is not None and not all_agree(hit):
        hit, reason = False, reason or "another rank could not load it"
    if hit:
        log(f"{PREFIX} cache hit {path} ({ref.summary()}){who}")
        return ref, True

    log(f"{PREFIX} cache miss {path} ({reason}); computing{who}")
    start = time.perf_counter()
    error: Exception | None = None
    computed = None
    try:
        computed = _normalize(compute(), key, parts)
    except (TypeError, ValueError) as e:
        error = e  # raised after the barrier, so the other ranks are not left waiting
    elapsed = time.perf_counter() - start
    if rank == 0 and computed is not None:
        try:
            save_ref_logprobs(path, computed)
        except Exception as e:
            log(f"{PREFIX} could not write {path} ({type(e).__name__}: {e}); using the computed values")
    if world_size > 1:
        barrier()
    if error is not None:
        raise error

    loaded, why = _read(path, key, parts)
    if loaded is None:
        log(f"{PREFIX} could not read back {path} ({why}); using the values computed on this rank{who}")
        return computed, False
    if rank != 0:
        _warn_if_different(loaded, computed, log, who)
    verb = "wrote" if rank == 0 else "loaded rank 0's"
    log(f"{PREFIX} computed {computed.summary()} in {elapsed:.1f}s; {verb} {path}{who}")
    return loaded, False


def _warn_if_different(loaded: RefLogprobs, computed: RefLogprobs, log, who: str) -> None:
    # All ranks should compute the same numbers; a difference means the compute was not gathered.
    for s in computed.sets:
        a, b = loaded.logps.get(s), computed.logps[s]
        if a is None or a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-3):
            log(
                f"{PREFIX} set {s!r} differs between rank 0's file and this rank's compute(){who}; "
                "using rank 0's (is compute() gathering across ranks?)"
            )


# ----------------------------------------------------------------------------------------------
# Spot check
# ----------------------------------------------------------------------------------------------


def verify_ref_logprobs(
    ref: RefLogprobs,
    recompute: Callable[[str, Tensor], Tensor],
    *,
    sample: int = 8,
    seed: int = 0,
    atol: float = 1e-3,
    rtol: float = 1e-4,
) -> dict:
    """Recompute ``sample`` random examples of every set with ``recompute(set_name, indices) -> logps``
    and compare with the cache: |cached - recomputed| <= atol + rtol * |recomputed|.

    Returns ``{"ok": bool, "sets": {name: {"indices", "max_abs_diff", "worst_index", "ok"}}}`` and
    raises ValueError, naming the set and the index of the largest mismatch, if any example fails
    (the report is attached to the exception as ``.report``).
    The sample of each set depends only on ``seed`` and the set name.
    """
    if not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be an int >= 1, got {sample!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got {atol}, {rtol}")
    report: dict = {"ok": True, "sets": {}}
    worst: tuple[float, str, int, float, float] | None = None
    for s in ref.sets:
        n = ref.num_examples(s)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.encode()))
        idx = torch.randperm(n, generator=gen)[: min(sample, n)].sort().values
        entry = {"indices": idx.tolist(), "max_abs_diff": 0.0, "worst_index": None, "ok": True}
        report["sets"][s] = entry
        if not idx.numel():
            continue
        got = recompute(s, idx)
        got = torch.as_tensor(got).detach().to("cpu", torch.float32).reshape(-1)
        if got.shape != idx.shape:
            raise ValueError(
                f"recompute({s!r}, indices) returned {got.numel()} values for {idx.numel()} indices"
            )
        cached = ref.logps[s][idx]
        diff = (cached - got).abs().nan_to_num(nan=float("inf"))
        bad = (diff > atol + rtol * got.abs()) | ~torch.isfinite(got)
        j = int(diff.argmax())
        entry.update(max_abs_diff=float(diff[j]), worst_index=int(idx[j]), ok=not bool(bad.any()))
        if not entry["ok"]:
            report["ok"] = False
            if worst is None or float(diff[j]) > worst[0]:
                worst = (float(diff[j]), s, int(idx[j]), float(cached[j]), float(got[j]))
    if worst is not None:
        d, s, i, c, g = worst
        failing = [name for name, e in report["sets"].items() if not e["ok"]]
        error = ValueError(
            f"reference log-probs do not match a recompute: set {s!r} index {i}: cached {c:.6g}, "
            f"recomputed {g:.6g} (|diff| {d:.3g} > atol {atol} + rtol {rtol}); failing sets: {failing}"
        )
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report
