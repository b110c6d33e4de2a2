"""The lock (requirements/) that `make demo` and `make test` install: complete and inside pyproject's ranges."""

import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in found, f"{path.name}: {name} pinned twice"
            found[canonicalize_name(name)] = version
    return found


LOCK = pins(REPO / "requirements" / "lock.txt")
TORCH_CPU = pins(REPO / "requirements" / "torch-cpu.txt")


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    texts = PYPROJECT["dependencies"] + [r for extra in extras for r in PYPROJECT["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


# The build tools are the one thing pip leaves out of a freeze (and never needs pinned to run).
UNFROZEN = {"setuptools", "wheel", "pip"}


@pytest.mark.parametrize("extras", [(), ("dev",), ("lean", "trl")], ids=lambda e: ",".join(e) or "base")
def test_lock_pins_every_requirement_inside_its_range(extras):
    for requirement in requirements(extras):
        name = canonicalize_name(requirement.name)
        if name in UNFROZEN or (requirement.marker and not requirement.marker.evaluate()):
            continue
        version = LOCK.get(name) or TORCH_CPU.get(name)
        assert version, f"{requirement.name} is not in requirements/lock.txt: run `make lock`"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/ pins {requirement.name}=={version}, outside pyproject's {requirement}: run `make lock`"
        )


def test_torch_and_triton_stay_out_of_the_lock():
    """A CUDA torch (and the triton it pins) in the user's environment must never be replaced by `-c`."""
    assert set(TORCH_CPU) == {"torch", "triton"}
    assert not {n for n in LOCK if n in TORCH_CPU or n.startswith("nvidia-")}


@pytest.mark.parametrize("target", ["install", "install-dev"])  # what make demo / make test run
@pytest.mark.torchrun
def test_makefile_installs_with_the_lock(target):
    recipe = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = [line for line in recipe.stdout.splitlines() if re.search(r"pip install .*-e", line)]
    assert lines and all("-c requirements/lock.txt" in line for line in lines), recipe.stdout
    assert any("pip install -r requirements/torch-cpu.txt" in line for line in recipe.stdout.splitlines())
