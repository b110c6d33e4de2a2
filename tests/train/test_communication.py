"""The planner's communication model (fastnpo/train/communication.py), against numbers worked
out by hand for Llama-3.1-70B-sized steps (70e9 parameters, bf16 all-gathers, fp32 reductions)."""

import pytest

from fastnpo.train.communication import communication_plan, format_communication, step_collectives

P = 70 * 10**9
GB = 1e9


def seventy_b(**kwargs):
    return step_collectives(gathered_bytes=2 * P, reduced_bytes=4 * P, **kwargs)


def by_name(collectives):
    return {c.name.split(" ")[0]: c for c in collectives}


def test_one_node_sends_nothing_across_nodes():
    c = by_name(seventy_b(nodes=1, gpus_per_node=8, hybrid=False))
    # 2 all-gathers (forward, backward) of 140 GB, each GPU receiving 7/8 of it
    assert c["all-gather"].per_step == 2 and c["all-gather"].intra_node_bytes == pytest.approx(2 * 7 / 8 * 140 * GB)
    assert c["reduce-scatter"].intra_node_bytes == pytest.approx(7 / 8 * 280 * GB)
    assert c["all-gather"].inter_node_bytes == 0 and c["reduce-scatter"].inter_node_bytes == 0
    # hybrid on one node is full sharding
    assert by_name(seventy_b(nodes=1, gpus_per_node=8, hybrid=True)).keys() == c.keys()


def test_full_sharding_over_two_nodes():
    c = by_name(seventy_b(nodes=2, gpus_per_node=8, hybrid=False))
    # the node fetches the other node's half through its 8 NICs: 70 GB / 8 per GPU per all-gather
    assert c["all-gather"].inter_node_bytes == pytest.approx(2 * 8.75 * GB)
    assert c["all-gather"].intra_node_bytes == pytest.approx(2 * (15 / 16 * 140 - 8.75) * GB)
    assert c["reduce-scatter"].inter_node_bytes == pytest.approx(17.5 * GB)
    assert c["reduce-scatter"].intra_node_bytes == pytest.approx((15 / 16 * 280 - 17.5) * GB)


def test_hybrid_sharding_over_two_nodes_crosses_only_with_the_gradient_shards():
    c = by_name(seventy_b(nodes=2, gpus_per_node=8, hybrid=True))
    assert c["all-gather"].inter_node_bytes == 0 and c["reduce-scatter"].inter_node_bytes == 0
    assert c["all-gather"].intra_node_bytes == pytest.approx(2 * 7 / 8 * 140 * GB)
    # each GPU's fp32 gradient shard is 280 GB / 8 = 35 GB; a ring all-reduce over 2 replicas
    # sends and receives 2 x 1/2 of it
    assert c["all-reduce"].inter_node_bytes == pytest.approx(35 * GB)
    plan = communication_plan(list(c.values()), inter_node_gbps=400)
    assert plan["inter_node_seconds"] == pytest.approx(35 * GB * 8 / 400e9)  # 0.7 s at 50 GB/s
    assert plan["inter_node_gb"] == pytest.approx(35)


def test_micro_batches_and_resharding_scale_the_counts():
    base = by_name(seventy_b(nodes=4, gpus_per_node=8, hybrid=True))
    four = by_name(seventy_b(nodes=4, gpus_per_node=8, hybrid=True, micro_batches=4, reshard_after_forward=False))
    assert four["all-gather"].per_step == 4  # one per micro-batch: the backward reuses the forward's
    assert four["all-gather"].intra_node_bytes == pytest.approx(2 * base["all-gather"].intra_node_bytes)
    assert four["all-reduce"].inter_node_bytes == pytest.approx(4 * base["all-reduce"].inter_node_bytes)
    # over 4 replicas a ring all-reduce moves 2 x 3/4 of the 35 GB shard
    assert base["all-reduce"].inter_node_bytes == pytest.approx(2 * 3 / 4 * 35 * GB)


def test_the_table_names_every_collective_and_the_link_rates():
    text = format_communication(communication_plan(seventy_b(nodes=2, gpus_per_node=8, hybrid=True)))
    assert "all-reduce (gradient shards, across replicas)" in text and "network 400 Gb/s" in text
    assert "NVLink 3600 Gb/s" in text and "35.00" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, "nodes must be an int >= 1"),
        ({"gpus_per_node": 2.5}, "gpus_per_node must be an int >= 1"),
        ({"micro_batches": True}, "micro_batches must be an int >= 1"),
    ],
)
def test_bad_counts_are_refused_naming_them(kwargs, match):
    settings = {"nodes": 2, "gpus_per_node": 8, "hybrid": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        seventy_b(**settings)


def test_bad_link_rates_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--inter-node-gbps must be a number of Gb/s > 0"):
        communication_plan([], inter_node_gbps=0)


def plan_json(*args):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = repo / "configs" / "llama31_70b_npo_8gpu.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "fastnpo.cli", "plan", "--config", str(config), "--json", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 3), done.stderr
    return json.loads(done.stdout)


@pytest.mark.torchrun
def test_plan_for_two_nodes_of_eight_gpus_states_the_communication():
    """`fastnpo plan --nodes 2 --gpus-per-node 8` for 70B: per GPU and step, what crosses the nodes
    under full and under hybrid sharding, from the plan's own parameter counts."""
    full = plan_json("--nodes", "2", "--gpus-per-node", "8")
    hybrid = plan_json("--nodes", "2", "--gpus-per-node", "8", "distributed.fsdp=hybrid")
    params, trainable = full["shape"]["params"], full["trainable_params"]
    # bf16 parameters under mixed_precision=bf16: gathered in bf16, gradients reduced in fp32
    assert full["settings"]["dtype"] == "bfloat16" and full["settings"]["mixed_precision"] == "bf16"
    # full sharding over 16: two all-gathers and one reduce-scatter, each fetching the other node's half / 8 NICs
    across = (2 * params * 2 + trainable * 4) / 2 / 8
    assert full["communication"]["inter_node_gb"] == pytest.approx(across / GB)
    assert full["hybrid"] is None and full["settings"]["gpus"] == 16
    # hybrid: shards of 8 (memory as on one node), only the gradient shards' all-reduce crosses
    assert hybrid["hybrid"] == {"replicas": 2, "shard_size": 8} and hybrid["settings"]["gpus"] == 8
    assert hybrid["communication"]["inter_node_gb"] == pytest.approx(2 * 0.5 * trainable * 4 / 8 / GB)
    assert hybrid["total_gib"] > full["total_gib"]  # shards twice as large
    assert full["communication"]["inter_node_seconds"] == pytest.approx(across * 8 / 400e9)


@pytest.mark.torchrun
def test_plan_refuses_a_shard_size_that_does_not_divide_the_gpus():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = repo / "configs" / "llama31_70b_npo_8gpu.yaml"
    args = ["plan", "--config", str(config), "--nodes", "2", "--gpus-per-node", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "fastnpo.cli", *args, "distributed.fsdp=hybrid", "distributed.shard_size=6"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "distributed.shard_size: 6 must divide the 16 GPUs" in done.stderr, done.stderr
