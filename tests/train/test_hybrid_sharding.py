"""Hybrid sharding (HSDP, distributed.fsdp=hybrid) on CPU: two "nodes" of two gloo ranks, each
node its own torchrun launcher joined by a c10d rendezvous on localhost, as on a real cluster."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastnpo.distributed import ProcessInfo
from fastnpo.tiny import TinyModelSpec
from fastnpo.tofu.minitofu import prepare_tiny
from fastnpo.train import train
from fastnpo.train.config import ConfigError, load_config
from fastnpo.train.sharding import DistributedConfig, hybrid_shape

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
CPU = torch.device("cpu")


def info(world_size: int) -> ProcessInfo:
    return ProcessInfo(rank=0, world_size=world_size, local_rank=0, device=CPU)


def test_the_shard_group_is_a_node_unless_set(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hybrid_shape(DistributedConfig(fsdp="hybrid"), info(16)) == (2, 8)
    assert hybrid_shape(DistributedConfig(fsdp="hybrid", shard_size=4), info(16)) == (4, 4)
    assert hybrid_shape(DistributedConfig(fsdp="on"), info(16)) is None
    with pytest.raises(ValueError, match=r"distributed\.shard_size=6 \(as set: 6\) must divide the 16 processes"):
        hybrid_shape(DistributedConfig(fsdp="hybrid", shard_size=6), info(16))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"shard_size=0 \(the processes per node: 3\) must divide the 16"):
        hybrid_shape(DistributedConfig(fsdp="hybrid"), info(16))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("distributed.fsdp=hybird", r"distributed\.fsdp: must be auto, on, hybrid or off"),
        ("distributed.shard_size=-1", r"distributed\.shard_size: must be an int >= 0"),
        ("distributed.shard_size=2", r"distributed\.shard_size: is for distributed\.fsdp=hybrid"),
    ],
)
def test_bad_hybrid_settings_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, [override])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# NPO+RT (per-sequence), WGA (per-token), and NPO+RT with the optimizer step in the backward (its
# gradient norm sums each shard once although two nodes hold it).
RUNS = {
    "npo_rt": {"method.name": "npo_rt"},
    "wga": {"method.name": "wga"},
    "npo_rt-in_backward": {"method.name": "npo_rt", "optim.in_backward": "true", "optim.max_grad_norm": 0},
}


def overrides(tiny, out, **extra):
    values = {
        "model.name_or_path": tiny["base"],
        "data.forget": tiny["data"],
        "data.retain": tiny["data"],
        "data.batch_size": 2,
        "data.retain_batch_size": 2,
        "data.max_length": 64,
        "run.output_dir": out,
        "run.progress": False,
        "run.checkpoint_every": 2,
        "optim.lr": 1e-3,
        "optim.max_steps": 3,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    tiny = prepare_tiny(
        root / "tiny", num_authors=20, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64)
    )
    runs = [
        {
            "config": str(CONFIG),
            "overrides": overrides(
                tiny,
                root / name / "hybrid",
                **extra,
                **{"distributed.fsdp": "hybrid", "run.cache_dir": root / name / "cache"},
            ),
        }
        for name, extra in RUNS.items()
    ]
    (root / "runs.json").write_text(json.dumps(runs))
    port = free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=hybrid-test",
                str(Path(__file__).parent / "two_rank_runs.py"),
                str(root / "runs.json"),
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=600)[0])
    finally:
        for launcher in launchers:
            launcher.kill()
    return root, tiny, [launcher.returncode for launcher in launchers], outputs


@pytest.mark.parametrize("name", list(RUNS))
def test_two_nodes_of_two_ranks_match_one_process(two_nodes, name):
    """HSDP over a (2 replicas x 2 shards) mesh: after 3 steps the parameters equal one process's
    at the same global batch (8 forget + 8 retain examples) within the reduction-order tolerance of
    the other FSDP tests, and so do the logged gradient norms."""
    root, tiny, codes, outputs = two_nodes
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    folder = root / name
    # Sharded over the 2 ranks of a node, not all 4: the checkpoint holds each parameter in 2 pieces.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder / "hybrid" / "checkpoints" / "step_2")).read_metadata()
    embedding = next(v for k, v in metadata.state_dict_metadata.items() if k.endswith("embed_tokens.weight"))
    rows, dim = embedding.size
    assert [tuple(chunk.sizes) for chunk in embedding.chunks] == [(rows // 2, dim)] * 2, embedding.chunks

    one = {**RUNS[name], "data.batch_size": 8, "data.retain_batch_size": 8, "run.cache_dir": folder / "cache"}
    train(load_config(CONFIG, overrides(tiny, folder / "one", **one)))
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    split = load_file(folder / "hybrid" / "final" / "model.safetensors")
    single = load_file(folder / "one" / "final" / "model.safetensors")
    assert split.keys() == single.keys()
    for key in single:
        moved = (single[key] - initial[key]).abs().max().item()
        assert moved > 1e-4, key
        torch.testing.assert_close(split[key], single[key], atol=0.01 * moved, rtol=0, msg=key)
    records = [
        [json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "hybrid")
    ]
    for a, b in zip(*records, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a["step"], name)
