"""docs/trainer.md documents every config key with its current default, and every link in the docs
resolves (issue 25 item 6). Every section of Config, `eval` included, has its heading and table.

Each config section (`## model`, `## data`, ...) of docs/trainer.md holds a table with one row per key
of its dataclass: `` | `key` | `default` | meaning | ``, the default written as YAML / JSON writes it.
Adding, renaming or re-defaulting a key without the doc fails here, as does a doc row or a
`section.key` mention for a key that does not exist. Links: every relative link of README.md and
docs/*.md names an existing file, and every #anchor a heading of its target (GitHub's slugs).
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fastnpo.methods import METHODS, PARAMETERS
from fastnpo.train.config import RENAMED_KEYS, Config

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "docs" / "trainer.md"
SECTIONS = [f.name for f in dataclasses.fields(Config)]
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \| (.+) \|$")
LINKED_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def defaults(cls, prefix: str = "") -> dict:
    """Dotted key -> default of a config dataclass, nested dataclasses (model.lora) flattened."""
    found = {}
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            found.update(defaults(type(value), f"{prefix}{f.name}."))
        else:
            found[prefix + f.name] = value
    return found


def section_text(text: str, name: str) -> str:
    match = re.search(rf"^## `?{name}`?\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/trainer.md has no `## {name}` heading"
    return match.group(1)


def rows(name: str) -> dict[str, tuple[str, str]]:
    """key -> (default cell, meaning) of a section's table."""
    found = {}
    for line in section_text(TRAINER.read_text(), name).splitlines():
        if match := ROW.match(line):
            key, default, meaning = match.groups()
            assert key not in found, f"## {name}: `{key}` documented twice"
            found[key] = (default, meaning)
    return found


def section_class(name: str):
    return next(f.type for f in dataclasses.fields(Config) if f.name == name)


@pytest.mark.parametrize("name", SECTIONS)
def test_every_key_is_documented_with_its_default(name):
    want = defaults(section_class(name))
    got = rows(name)
    missing = sorted(set(want) - set(got))
    unknown = sorted(set(got) - set(want))
    assert not missing, f"docs/trainer.md ## {name}: undocumented keys {missing}"
    assert not unknown, f"docs/trainer.md ## {name}: keys that do not exist {unknown}"
    for key, value in want.items():
        cell = got[key][0]
        try:
            written = json.loads(cell)
        except json.JSONDecodeError:
            pytest.fail(f"## {name}: `{key}`'s default `{cell}` is not written as YAML / JSON writes it")
        same = written == value and type(written) in (type(value), int if type(value) is float else type(value))
        assert same, f"docs/trainer.md ## {name}: `{key}` says default `{cell}`, the code has {value!r}"


def test_method_defaults_that_come_from_the_method_are_documented():
    # A null method key takes the running method's default: the row names it.
    documented = rows("method")
    for key, value in PARAMETERS.items():
        assert f"`{json.dumps(value)}`" in documented[key][1], f"method.{key}: its default {value!r} is not named"
    for beta in {method.defaults["beta"] for method in METHODS.values()}:
        assert f"`{json.dumps(beta)}`" in documented["beta"][1], f"method.beta: default {beta} is not named"
    names = set(re.findall(r"`(\w+)`", documented["name"][1]))
    assert set(METHODS) <= names, f"method.name's row lacks {sorted(set(METHODS) - names)}"


def config_keys() -> set[str]:
    keys = {f"{section}.{key}" for section in SECTIONS for key in defaults(section_class(section))}
    return keys | {key.rsplit(".", 1)[0] for key in keys if key.count(".") > 1}  # and model.lora


def named_keys(span: str, overrides_only: bool) -> list[str]:
    """The `section.key` names in a code span (not parts of paths or attribute chains); with
    overrides_only, only those written as `section.key=value`."""
    sections = "|".join(SECTIONS)
    tail = "(?==)" if overrides_only else r"(?![\w(*])"
    found = re.findall(rf"(?<![\w/.-])((?:{sections})\.[A-Za-z_][\w.]*\w){tail}", span)
    return [key for key in found if not key.endswith((".py", ".json", ".yaml", ".md"))]


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: p.name)
def test_the_docs_name_no_key_that_does_not_exist(path):
    # docs/trainer.md: every `section.key` in a code span; elsewhere every `section.key=value`.
    # The keys that moved (RENAMED_KEYS) may be named only where the move is told: ## eval.
    keys = config_keys()
    renamed = section_text(TRAINER.read_text(), "eval") if path == TRAINER else ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for span in re.findall(r"`([^`]+)`", line):
            for key in named_keys(span, overrides_only=path != TRAINER):
                told = key in RENAMED_KEYS and line in renamed
                assert key in keys or told, f"{path.name}:{number}: `{key}` is not a config key"


def test_the_moved_keys_are_told_with_their_new_names():
    text = section_text(TRAINER.read_text(), "eval")
    keys = config_keys()
    for old, new in RENAMED_KEYS.items():
        assert old not in keys and new in keys, f"{old} -> {new}"
        assert f"`{old}`" in text, f"docs/trainer.md ## eval does not name the old key {old}"
        assert new.startswith("eval.") and f"| `{new.split('.', 1)[1]}` |" in text


def test_the_key_check_reads_what_it_should():
    assert defaults(section_class("model"))["lora.r"] == 8
    assert ROW.match('| `template` | `"[INST] {question} [/INST]"` | a format string |')
    assert "lora.r" in rows("model") and "timeout_s" in rows("distributed")
    span = "optim.name=adamw_kahan optim.state_dtype=bfloat16 run.bogus=1 fastnpo/train/config.py model.get_decoder()"
    assert named_keys(span, overrides_only=False) == ["optim.name", "optim.state_dtype", "run.bogus"]
    assert named_keys("method.satimp_beta1/2, method.rmu_*", overrides_only=False) == ["method.satimp_beta1"]
    assert named_keys("eval.keep_best_mode=max|min run.cache_dir", overrides_only=True) == ["eval.keep_best_mode"]


# ------------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code blocks and code spans."""
    found = []
    in_block = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return found


def test_slugs_follow_github():
    assert slug("Drop-in: Hugging Face Trainer, TRL, PEFT") == "drop-in-hugging-face-trainer-trl-peft"
    assert slug("TOFU's numbers") == "tofus-numbers"
    assert slug("`model`") == "model" and slug("Will it fit?") == "will-it-fit"
    assert slug("GPU: one NVIDIA H200 (2026-11-27, two windows)") == "gpu-one-nvidia-h200-2026-11-27-two-windows"


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: p.name)
def test_every_link_resolves(path):
    for number, target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = f"{path.relative_to(REPO)}:{number}: {target}"
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{where}: no such file"
        if anchor:
            assert resolved.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
            assert anchor in anchors(resolved), f"{where}: no heading with this anchor in {resolved.name}"
