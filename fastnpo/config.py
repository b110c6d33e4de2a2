"""Typed configs from YAML files and dotted key=value overrides (OmegaConf structured configs).

Each component owns its dataclass (DataConfig in data/, MethodConfig in methods/, LoraConfig
in modeling.py, ...); a command assembles them into one tree (train/config.py, u2a/run.py)
and loads it here. OmegaConf rejects unknown keys and wrongly typed values by full key name;
each section checks its own values in __post_init__ (ConfigError naming the dotted key), and the
command checks what spans sections.
"""

import contextvars
import dataclasses
import difflib
import math
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


_READING_DEFAULTS = contextvars.ContextVar("fastnpo_reading_defaults", default=False)


def reading_defaults() -> bool:
    """True while load_structured reads a schema's defaults. A section whose defaults depend on
    another of its keys (MethodConfig's on method.name) leaves them unresolved (None) then, and
    resolves them when the merged values are built."""
    return _READING_DEFAULTS.get()


def load_structured(schema: type[T], path: str | Path | None = None, overrides=(), renamed=None) -> T:
    """Defaults of `schema` <- YAML file <- `key=value` overrides; raises ConfigError naming the key.
    renamed: {old dotted key: new dotted key} of keys that moved; an old key in the file or an
    override is refused with "<old> is now <new>" (before OmegaConf's "not in" would say less)."""
    renamed = renamed or {}
    token = _READING_DEFAULTS.set(True)
    try:
        merged = OmegaConf.structured(schema)
    finally:
        _READING_DEFAULTS.reset(token)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = _load_yaml(path)
            _refuse_renamed(OmegaConf.to_container(loaded), renamed, f"config file {path}")
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].strip()
            for old, new in renamed.items():
                if key == old or key.startswith(old + "."):
                    raise ConfigError(f"{old} is now {new} (override {item!r})")
        for item in overrides:
            merged = _merge_override(merged, item)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        first_line = str(error).splitlines()[0]
        if isinstance(error, ConfigKeyError) and first_line.startswith("Key '"):
            first_line = _with_closest_key(first_line, error)
        raise ConfigError(f"{key}: {first_line}" if key else first_line) from None


def _refuse_renamed(tree, renamed: dict, where: str) -> None:
    """ConfigError "<old> is now <new>" for the first renamed key present in a loaded YAML tree."""
    for old, new in renamed.items():
        node = tree
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"{old} is now {new} ({where})")


def _merge_override(merged, item: str):
    """One `key=value` override merged in. The value is read as YAML (numbers, booleans, lists);
    a value that is not YAML (`data.template=[INST] {question} [/INST]`), or whose YAML reading
    (a list or mapping) the key does not take, is taken as the string typed."""
    key, text = item.split("=", 1)
    try:
        override = OmegaConf.from_dotlist([item])
    except yaml.YAMLError:
        return OmegaConf.merge(merged, _as_string(key, text))
    try:
        return OmegaConf.merge(merged, override)
    except OmegaConfBaseException:
        if not isinstance(OmegaConf.select(override, key, throw_on_missing=False), (DictConfig, ListConfig)):
            raise
        try:
            return OmegaConf.merge(merged, _as_string(key, text))
        except OmegaConfBaseException:
            pass
        raise  # the YAML reading's error: the string was no better


def _as_string(key: str, text: str):
    override = OmegaConf.create()
    OmegaConf.update(override, key, text)
    return override


def _with_closest_key(message: str, error: ConfigKeyError) -> str:
    """OmegaConf's "Key 'rnak' not in 'LoraConfig'" with the closest valid key named (OmegaConf
    names one only when it is close by its own measure)."""
    parent = getattr(error, "parent_node", None)
    keys = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    # 0.3: 'rnak' finds 'r' (0.4); a key like nothing there ('foo') gets the list instead of a guess
    closest = difflib.get_close_matches(str(error.key), keys, n=1, cutoff=0.3)
    message = message.split(". Did you mean", 1)[0]
    if closest:
        return f"{message}. Did you mean {closest[0]!r}?"
    return f"{message}. Valid keys: {', '.join(keys)}" if keys else message


def _load_yaml(path: Path):
    """OmegaConf.load, with a YAML syntax error turned into a ConfigError naming the file and line."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:

        def at(mark) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}"

        mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f", {at(mark)}" if mark is not None else ""
        detail = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        if context:  # e.g. "while parsing a flow sequence", started where context_mark says
            detail += f" ({context}{' at ' + at(context_mark) if context_mark is not None else ''})"
        raise ConfigError(f"config file {path}{where}: YAML syntax error: {detail}") from None


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def require_finite(section: str, config) -> None:
    """Every float of a dataclass section (lists included) is finite: YAML and overrides accept
    inf and nan, which would only show up later as a diverged or silently broken run."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float):
                require(math.isfinite(number), f"{section}.{item.name}", "must be a finite number", value)


def require(condition: bool, key: str, message: str, value) -> None:
    """Raise ConfigError("<key>: <message>, got <value>") unless condition holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}, got {value!r}")
