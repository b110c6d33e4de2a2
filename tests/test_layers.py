"""The package's layering: a lower layer never imports a higher one (DESIGN.md, README Layout)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastnpo"

# What each component may import from fastnpo (besides itself). kernels/ is installed as
# fastnpo.kernels and imports nothing from fastnpo.
ALLOWED = {
    "kernels": set(),
    "ops": {"kernels"},
    "config": set(),
    "files": set(),
    "distributed": set(),
    "profiling": set(),
    "tiny": set(),
    "losses": {"ops"},
    "methods": {"losses", "config", "ops"},
    "data": {"ops", "config"},  # the IGNORE_INDEX constant only: the data layer holds no op
    "modeling": {"ops"},
    "refcache": {"data", "modeling", "distributed", "files", "ops"},
    "train": {
        "config",
        "data",
        "distributed",
        "files",
        "losses",
        "methods",
        "modeling",
        "ops",
        "profiling",
        "refcache",
    },
    "integrations": {"losses", "methods", "modeling", "ops", "refcache"},
    "u2a": {"config", "data", "files", "losses", "modeling", "ops", "refcache", "tiny"},
    # The demo runs the trainer on Mini-TOFU: the one edge between the top-level components.
    "tofu": {"config", "console", "data", "files", "methods", "modeling", "ops", "tiny", "train"},
    # The MUSE study and evaluation: beside tofu, whose privacy metrics it reuses.
    "muse": {"config", "console", "data", "files", "methods", "modeling", "ops", "tiny", "tofu", "train"},
    "console": set(),
    "cli": {"config", "console", "files", "muse", "train", "tofu", "u2a"},
    "__init__": {"losses", "ops"},
}


def component(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_components(path: Path) -> set[str]:
    """Top-level fastnpo components a module imports (absolute or relative, at any depth)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            names = [name] if node.module else [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for full in names:
            parts = full.split(".")
            if parts[0] == "fastnpo" and len(parts) > 1:
                found.add(parts[1])
    return found


# fastnpo/kernels is a link to the top-level kernels/ (kernels/README.md), which rglob does not follow.
MODULES = sorted({*PACKAGE.rglob("*.py"), *(PACKAGE / "kernels").glob("*.py")})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_layers(path):
    own = component(path)
    assert own in ALLOWED, f"{own} is a new component: place it in the layer table"
    outside = imported_components(path) - {own} - ALLOWED[own]
    assert not outside, f"{path.relative_to(PACKAGE)} imports {sorted(outside)}, above or beside its layer"


def test_the_check_sees_relative_imports():
    # A check that cannot fail is no check: the trainer's loop really imports the refcache.
    assert "refcache" in imported_components(PACKAGE / "train" / "setup.py") | imported_components(
        PACKAGE / "train" / "loop.py"
    )


def test_the_kernels_are_checked_too():
    kernels = [p for p in MODULES if component(p) == "kernels"]
    assert {p.name for p in kernels} == {p.name for p in (PACKAGE.parent / "kernels").glob("*.py")} != set()
