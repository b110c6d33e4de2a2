"""The multi-node launch documentation (issue 28 item 5) against the tested launch: the torchrun
options of docs/launch/fastnpo_2x8.sbatch and of docs/multi_node.md, with their variables given the
test's values, equal those tests/train/test_hybrid_sharding.py launches its two "nodes" with (the
one function hybrid_launch, built on helpers.multi_node_torchrun); the 2 x 8 config loads and names
hybrid sharding. Text only: nothing is launched here."""

import re
import shlex
from pathlib import Path

import pytest
from test_hybrid_sharding import hybrid_launch

from fastnpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "docs" / "launch" / "fastnpo_2x8.sbatch"
GUIDE = REPO / "docs" / "multi_node.md"
CONFIG = "configs/llama31_70b_npo_rt_2x8.yaml"
PORT = 29400
PROGRAM = ["-m", "fastnpo.cli", "train", "--config", CONFIG]


def torchrun_command(text: str, where: str) -> list[str]:
    """The words of the one `torchrun ...` command in `text` (backslash-continued lines joined),
    without the word torchrun."""
    found = re.findall(r"^\s*(?:exec\s+)?torchrun\s+((?:[^\n]*\\\n)*[^\n]*)", text, flags=re.MULTILINE)
    assert len(found) == 1, f"{where}: expected one torchrun command, found {len(found)}"
    return shlex.split(found[0].replace("\\\n", " "))


def substituted(words: list[str], values: dict[str, str], where: str) -> list[str]:
    """$NAME and ${NAME} replaced by values[NAME]; a variable without a value fails the test."""

    def value(match):
        name = match.group(1) or match.group(2)
        assert name in values, f"{where}: ${name} has no test value"
        return values[name]

    return [re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word) for word in words]


def split_program(words: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the program and its arguments from -m on)."""
    assert "-m" in words, words
    at = words.index("-m")
    return words[:at], words[at:]


@pytest.mark.parametrize("node", [0, 1])
def test_the_slurm_script_launches_what_the_hybrid_test_launches(node):
    text = SBATCH.read_text()
    values = {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node),
        "GPUS_PER_NODE": "2",  # 8 in the script: the test's "nodes" have 2 processes
        "HEAD_NODE": "127.0.0.1",
        "PORT": str(PORT),
        "SLURM_JOB_ID": "hybrid-test",
        "CONFIG": CONFIG,
    }
    options, program = split_program(substituted(torchrun_command(text, SBATCH.name), values, SBATCH.name))
    assert options == hybrid_launch(node, PORT)
    assert program == PROGRAM
    # The script's own values: 2 nodes, one torchrun (task) each, 8 GPUs and 8 processes per node,
    # the rendezvous on the first host and the config it names by default.
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "export GPUS_PER_NODE=8",
        'export HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"CONFIG=${{CONFIG:-{CONFIG}}}",
    ):
        assert line in text.splitlines(), line
    # $SLURM_NODEID must be expanded on each node, not once by the batch shell (node 0's):
    # srun runs the torchrun line in single quotes.
    assert re.search(r"srun [^\n]*bash -c '\n(?:exec\s+)?torchrun ", text)


@pytest.mark.parametrize("node", [0, 1])
def test_the_documented_multi_node_command_is_the_tested_one(node):
    text = GUIDE.read_text()
    values = {
        "NODE_RANK": str(node),
        "GPUS_PER_NODE": "2",
        "HEAD_NODE": "127.0.0.1",
        "PORT": str(PORT),
        "JOB_ID": "hybrid-test",
    }
    options, program = split_program(substituted(torchrun_command(text, GUIDE.name), values, GUIDE.name))
    assert options == hybrid_launch(node, PORT)
    assert program == PROGRAM
    assert "export HEAD_NODE=node001 PORT=29500 GPUS_PER_NODE=8 JOB_ID=npo70b" in text
    for named in ("distributed.shard_size", "run.cache_dir", "fastnpo plan --config", "launch/fastnpo_2x8.sbatch"):
        assert named in text, named


def test_the_2x8_config_loads_with_hybrid_sharding_over_a_node():
    config = load_config(REPO / CONFIG)
    assert config.distributed.fsdp == "hybrid" and config.distributed.shard_size == 8
    assert config.method.name == "npo_rt"
    assert config.model.name_or_path == "meta-llama/Llama-3.1-70B-Instruct"
    # the one-node config's global batch: 4 rows x 8 GPUs = 2 rows x 16
    one_node = load_config(REPO / "configs" / "llama31_70b_npo_8gpu.yaml")
    assert config.data.batch_size * 16 == one_node.data.batch_size * 8
