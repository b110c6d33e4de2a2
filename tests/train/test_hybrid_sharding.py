"""Hybrid sharding (HSDP, distributed.fsdp=hybrid) on CPU: two "nodes" of two gloo ranks, each
node its own torchrun launcher joined by a c10d rendezvous on localhost, as on a real cluster."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import multi_node_torchrun
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
    # bf16 parameters with Kahan-compensated AdamW, FSDP2's bf16 mixed precision (fp32 reduction),
    # activation checkpointing, the shards and the optimizer state offloaded to CPU memory (the
    # default clipping, a collective over the CPU DTensors); also stopped and resumed (RESUMED).
    # lr 1e-2: at 1e-3 the norm weights (1.0) stay within half a bf16 gap (see test_optimizers.py).
    "kahan-mp-ac-offload": {
        "method.name": "npo_rt",
        "model.dtype": "bfloat16",
        "distributed.mixed_precision": "bf16",
        "distributed.activation_checkpointing": "true",
        "optim.name": "adamw_kahan",
        "optim.offload": "true",
        "optim.lr": 1e-2,
    },
}
# torchao's 8-bit AdamW (fp32 parameters: no stochastic rounding, so the run is deterministic) in the
# backward, on the token-level method; run eagerly (EAGER_COMPILE, as test_optimizers.py does).
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
if HAS_TORCHAO:
    RUNS["wga-8bit-in_backward"] = {
        "method.name": "wga",
        "optim.name": "adamw_8bit",
        "optim.in_backward": "true",
        "optim.max_grad_norm": 0,
    }
# (adamw_8bit's state through a checkpoint on two ranks: test_optimizers.py.)
# Runs also stopped by a KeyboardInterrupt in step 3 (after the step-2 checkpoint) and resumed.
RESUMED = ["kahan-mp-ac-offload"]


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


def node_cache(root: Path, name: str, node: int) -> Path:
    """npo_rt's reference cache is node-local (a folder per node, as on local scratch disks); the
    other runs' is one folder both nodes share."""
    return root / name / (f"cache-node{node}" if name == "npo_rt" else "cache")


def hybrid_launch(node: int, port: int) -> list[str]:
    """torchrun's options for "node" 0 or 1 of the 2 x 2 job (tests/train/test_launch.py checks the
    documented multi-node command and the Slurm script against them)."""
    return multi_node_torchrun(
        nnodes=2, node_rank=node, nproc_per_node=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="hybrid-test"
    )


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    tiny = prepare_tiny(
        root / "tiny", num_authors=20, qa_per_author=2, spec=TinyModelSpec(hidden_size=32, intermediate_size=64)
    )
    port = free_port()
    launchers = []
    for node in (0, 1):
        runs = [
            {
                "config": str(CONFIG),
                "overrides": overrides(
                    tiny,
                    root / name / "hybrid",
                    **extra,
                    **{"distributed.fsdp": "hybrid", "run.cache_dir": node_cache(root, name, node)},
                ),
            }
            for name, extra in RUNS.items()
        ]
        # npo_rt again: every rank of both nodes now finds the file in its own node's folder
        again = {**RUNS["npo_rt"], "distributed.fsdp": "hybrid", "run.cache_dir": node_cache(root, "npo_rt", node)}
        runs.append({"config": str(CONFIG), "overrides": overrides(tiny, root / "npo_rt" / "again", **again)})
        # each RESUMED run again, stopped in step 3 on every rank, then resumed from its step-2 checkpoint
        for name in RESUMED:
            stopped = {**RUNS[name], "distributed.fsdp": "hybrid", "run.cache_dir": node_cache(root, name, node)}
            stopped = {"config": str(CONFIG), "overrides": overrides(tiny, root / name / "stopped", **stopped)}
            runs += [{**stopped, "stop_in_step": 3}, stopped]
        (root / f"runs-node{node}.json").write_text(json.dumps(runs))
        launchers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    *hybrid_launch(node, port),
                    str(Path(__file__).parent / "two_rank_runs.py"),
                    str(root / f"runs-node{node}.json"),
                ],
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1", "EAGER_COMPILE": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=600)[0])
    finally:
        for launcher in launchers:
            launcher.kill()
    return root, tiny, [launcher.returncode for launcher in launchers], outputs


def read_cache_file(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.torchrun
def test_each_node_writes_its_local_cache_and_all_ranks_agree_on_the_hit(two_nodes):
    """Node-local reference caches (run.cache_dir on each node's own disk): on the miss the first
    rank of each node wrote the file for its node; the second run hit on every rank. With one
    shared folder both nodes' writes left one file."""
    root, _, codes, outputs = two_nodes
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    local = [sorted(p.name for p in node_cache(root, "npo_rt", node).glob("ref-logprobs-*")) for node in (0, 1)]
    assert len(local[0]) == 1 and local[0] == local[1], local
    # the same numbers and metadata (safetensors writes metadata in a per-process hash order)
    files = [node_cache(root, "npo_rt", node) / local[node][0] for node in (0, 1)]
    (meta0, tensors0), (meta1, tensors1) = (read_cache_file(f) for f in files)
    assert meta0 == meta1 and tensors0.keys() == tensors1.keys()
    assert all(torch.equal(tensors0[k], tensors1[k]) for k in tensors0)
    info = {run: json.loads((root / "npo_rt" / run / "run_info.json").read_text()) for run in ("hybrid", "again")}
    assert [info["hybrid"]["reference_cache_hit"], info["again"]["reference_cache_hit"]] == [False, True]
    shared = node_cache(root, "npo_rt-in_backward", 0)
    assert node_cache(root, "npo_rt-in_backward", 1) == shared
    assert len(list(shared.glob("ref-logprobs-*"))) == 1 and not list(shared.glob(".*.tmp"))


@pytest.mark.torchrun
@pytest.mark.parametrize("name", list(RUNS))
def test_two_nodes_of_two_ranks_match_one_process(two_nodes, name, monkeypatch):
    """HSDP over a (2 replicas x 2 shards) mesh: after 3 steps the parameters equal one process's
    at the same global batch (8 forget + 8 retain examples) with the same settings, within the
    reduction-order tolerance of the other FSDP tests, and so do the logged gradient norms."""
    root, tiny, codes, outputs = two_nodes
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    folder = root / name
    # Sharded over the 2 ranks of a node, not all 4: the checkpoint holds each parameter in 2 pieces.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder / "hybrid" / "checkpoints" / "step_2")).read_metadata()
    embedding = next(v for k, v in metadata.state_dict_metadata.items() if k.endswith("embed_tokens.weight"))
    rows, dim = embedding.size
    assert [tuple(chunk.sizes) for chunk in embedding.chunks] == [(rows // 2, dim)] * 2, embedding.chunks

    # optim.offload over one process on the CPU (see test_train.py's offload_on_cpu); torchao eagerly
    import fastnpo.train.setup as setup

    monkeypatch.setattr(setup, "OFFLOAD_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "compile", lambda fn=None, **options: fn)
    one = {**RUNS[name], "data.batch_size": 8, "data.retain_batch_size": 8, "run.cache_dir": node_cache(root, name, 0)}
    train(load_config(CONFIG, overrides(tiny, folder / "one", **one)))
    initial = load_file(Path(tiny["base"]) / "model.safetensors")
    split = load_file(folder / "hybrid" / "final" / "model.safetensors")
    single = load_file(folder / "one" / "final" / "model.safetensors")
    assert split.keys() == single.keys()
    if RUNS[name].get("model.dtype") == "bfloat16":
        assert_bf16_runs_agree(name, initial, single, split)
    else:
        for key in single:
            moved = (single[key] - initial[key]).abs().max().item()
            assert moved > 1e-4, key
            torch.testing.assert_close(split[key], single[key], atol=0.01 * moved, rtol=0, msg=key)
    records = [
        [json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "hybrid")
    ]
    # bf16 parameters: bf16 gradients, so clipping's norm is a bf16 number (one gap: 2^-7 relative)
    rel = 1e-2 if RUNS[name].get("model.dtype") == "bfloat16" else 1e-4
    for a, b in zip(*records, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel), (a["step"], name)


def assert_bf16_runs_agree(name, initial, single, split):
    """bf16 parameters after 3 steps: a weight whose gradient is near 0 may step the other way or
    round to the neighbouring bf16 number in one run and not the other, so the runs are compared
    in sum: |hybrid - one process| over every weight is at most 1% of how far the one-process run
    moved them all (measured 0.2%), at most 20% per tensor (measured 5%: one of a norm's 32 weights
    a bf16 gap apart). A step skipped on the replicated shards, or replicas left apart, put the
    lm_head alone 45% and 32% off."""
    differ = moved = 0.0
    for key in single:
        a, b, start = single[key].float(), split[key].float(), initial[key].float()
        assert (a - start).abs().max().item() > 1e-4, key
        tensor_differ, tensor_moved = (a - b).abs().sum().item(), (a - start).abs().sum().item()
        assert tensor_differ <= 0.2 * tensor_moved, (name, key, tensor_differ / tensor_moved)
        differ, moved = differ + tensor_differ, moved + tensor_moved
    assert differ <= 0.01 * moved, (name, differ / moved)


@pytest.mark.torchrun
@pytest.mark.parametrize("name", RESUMED)
def test_a_hybrid_run_stopped_and_resumed_ends_where_the_uninterrupted_one_does(two_nodes, name):
    """Checkpoint and resume under hybrid sharding (DCP over the 2-D mesh, the optimizer state of
    the mode included): the run stopped in step 3 and resumed from its step-2 checkpoint logs steps
    1, 2, 3 and ends with the parameters of the uninterrupted hybrid run, bit for bit."""
    root, _, codes, outputs = two_nodes
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    folder = root / name
    saved = json.loads((folder / "stopped" / "checkpoints" / "step_2" / "trainer.json").read_text())
    assert saved["step"] == 2, saved
    records = [json.loads(line) for line in (folder / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed after step 2, not started over
    straight = load_file(folder / "hybrid" / "final" / "model.safetensors")
    resumed = load_file(folder / "stopped" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
