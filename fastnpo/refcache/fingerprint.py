"""Fingerprints of what reference log-probs depend on (weights, config, tokenizer, examples) and the cache key."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_CHUNK_BYTES = 64 << 20  # device -> CPU copies and hash updates per tensor go in pieces of this size


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
