"""The repository cannot shadow an installed package, and fastnpo.kernels imports in every install mode.

transformers >= 5.25 imports Hugging Face's `kernels` package; a regular package named `kernels` at the
repository root shadowed it whenever the root was on sys.path (`python -m ...` from the root, which is
how the Makefile runs everything). kernels/README.md says how the layout avoids it. Every check runs in
a subprocess started in the repository root, as a user's command would.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (REPO / "kernels").glob("*.py"))


def run_python(code: str, cwd: Path, env_path: str | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HUB_OFFLINE": "1"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"in {cwd}:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.torchrun
def test_repo_root_does_not_shadow_huggingface_kernels(tmp_path):
    """From the root: the `kernels` module is Hugging Face's, and transformers builds and loads a model."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is in the dev extra")
    code = f"""
import json, kernels, transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64)
LlamaForCausalLM(config).save_pretrained({str(tmp_path / "tiny")!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "tiny")!r})
print(json.dumps({{"kernels": kernels.__file__, "model": type(model).__name__}}))
"""
    found = json.loads(run_python(code, cwd=REPO))
    assert found["kernels"] and not Path(found["kernels"]).resolve().is_relative_to(REPO / "kernels"), found
    assert found["model"] == "LlamaForCausalLM"


def test_kernels_folder_is_not_a_regular_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow HF's kernels"
    link = REPO / "fastnpo" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()


IMPORTS = f"""
import json, fastnpo, fastnpo.ops, fastnpo.kernels
import importlib
for name in {KERNEL_MODULES!r}:
    importlib.import_module("fastnpo.kernels." + name)
print(json.dumps({{"fastnpo": fastnpo.__file__, "kernels": list(fastnpo.kernels.__path__)}}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """fastnpo built as a wheel the way `pip install .` builds it (no dependencies, no isolation:
    the dev extra holds setuptools and wheel, so no download)."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = out.glob("fastnpo-*.whl")
    return found


@pytest.mark.torchrun
def test_wheel_holds_every_package_of_the_source_tree(wheel):
    """pyproject.toml lists the packages by hand (the kernels link needs it): a new subpackage
    missing there would install from a wheel without it."""
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "fastnpo").rglob("__init__.py"))
    packages = [p for p in packages if not p.startswith("fastnpo/kernels/")]  # the link: the test below
    assert [p for p in packages if p not in names] == []


@pytest.mark.torchrun
def test_wheel_holds_the_kernels_as_fastnpo_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"fastnpo/kernels/{m}.py" for m in KERNEL_MODULES} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ in the wheel"


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
@pytest.mark.torchrun
def test_regular_install_imports_kernels_from_any_folder(wheel, tmp_path, where):
    """`pip install .` (here: the wheel into a target folder on PYTHONPATH, the editable install
    hidden behind it): fastnpo.kernels imports from the root, where the root's fastnpo/ wins, and
    from any other folder, where the installed copy does."""
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    cwd = REPO if where == "repo-root" else tmp_path
    found = json.loads(run_python(IMPORTS, cwd=cwd, env_path=str(site)))
    expected = REPO if where == "repo-root" else site
    assert Path(found["fastnpo"]).parent.parent == expected, found


@pytest.mark.torchrun
def test_editable_install_imports_kernels_from_elsewhere(tmp_path):
    found = json.loads(run_python(IMPORTS, cwd=tmp_path))
    assert Path(found["fastnpo"]).resolve().parent == REPO / "fastnpo", "the suite runs on an editable install"
    assert [Path(p).resolve() for p in found["kernels"]] == [(REPO / "kernels").resolve()]


@pytest.mark.torchrun
def test_makefile_demo_command_runs_from_the_root(tmp_path):
    """The Makefile's demo line, run as written from the root, on the quick preset into a scratch folder."""
    recipe = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    (line,) = [cmd for cmd in recipe.splitlines() if "-m fastnpo.cli demo" in cmd]
    args = line.split()[line.split().index("-m") :]
    done = subprocess.run(
        [sys.executable, *args, "--preset", "quick", "--out", str(tmp_path / "demo")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "demo" / "results.md").exists()
