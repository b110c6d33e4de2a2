"""What FSDP2 sends per training step, within a node and across nodes, and how long that takes.

The model is the bandwidth-bound one of ring collectives: in an all-gather or a reduce-scatter
over W ranks of a tensor of S bytes, each rank sends and receives (W - 1) / W x S; in an
all-reduce, twice that. A collective that spans nodes needs, per node, the (n - 1) / n of the
data held by the other nodes, through the node's NICs; with one NIC per GPU (as on DGX/HGX
H100 machines), (n - 1) / n x S / g per GPU crosses nodes and the rest moves over NVLink.
Latency, overlap with compute and NCCL's protocol overheads are left out: the seconds are a
floor for the communication each GPU does, not the step time.

FSDP2, as fastnpo's trainer runs it, per micro-batch (grad_accum of them per step):
- full sharding over W = n x g ranks: one all-gather of the parameters (compute dtype) for the
  forward, one more for the backward when reshard_after_forward (default), one reduce-scatter
  of the gradients (reduce dtype: fp32 under distributed.mixed_precision=bf16);
- hybrid sharding (distributed.fsdp=hybrid, shard groups of g = a node): the same all-gathers
  and reduce-scatter inside the node, then an all-reduce of each GPU's gradient shard (S / g)
  across the n replicas.
"""

from dataclasses import dataclass

# NVLink 4 on an H100 / H200 SXM node: 900 GB/s per GPU both ways together, 450 GB/s each way.
DEFAULT_INTRA_NODE_GBPS = 3600.0
# One 400 Gb/s InfiniBand NDR (or RoCE) NIC per GPU, as on DGX / HGX H100 nodes.
DEFAULT_INTER_NODE_GBPS = 400.0


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: how many per step, and each GPU's bytes each way per step."""

    name: str
    per_step: int
    intra_node_bytes: float
    inter_node_bytes: float


def _ring_share(total: float, ranks: int) -> float:
    return (ranks - 1) / ranks * total


def _spanning(total: float, nodes: int, gpus_per_node: int) -> tuple[float, float]:
    """(intra-node, inter-node) bytes each GPU receives in an all-gather / reduce-scatter of
    `total` bytes over every rank of `nodes` nodes."""
    everything = _ring_share(total, nodes * gpus_per_node)
    across = _ring_share(total, nodes) / gpus_per_node
    return everything - across, across


def step_collectives(
    *,
    gathered_bytes: int,
    reduced_bytes: int,
    nodes: int,
    gpus_per_node: int,
    hybrid: bool,
    micro_batches: int = 1,
    reshard_after_forward: bool = True,
) -> list[Collective]:
    """Each GPU's collectives in one optimizer step (see the module docstring for the model).
    gathered_bytes: the parameters as all-gathered (every parameter, compute dtype); reduced_bytes:
    the gradients as reduced (trainable parameters, reduce dtype)."""
    for name, value, low in (
        ("gathered_bytes", gathered_bytes, 1),
        ("reduced_bytes", reduced_bytes, 1),
        ("nodes", nodes, 1),
        ("gpus_per_node", gpus_per_node, 1),
        ("micro_batches", micro_batches, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    gathered, reduced = float(gathered_bytes), float(reduced_bytes)
    gathers = micro_batches * (2 if reshard_after_forward else 1)
    if hybrid:
        inside = gpus_per_node
        out = [
            Collective("all-gather (parameters)", gathers, gathers * _ring_share(gathered, inside), 0.0),
            Collective("reduce-scatter (gradients)", micro_batches, micro_batches * _ring_share(reduced, inside), 0.0),
        ]
        if nodes > 1:
            shard = reduced / gpus_per_node
            across = micro_batches * 2 * _ring_share(shard, nodes)
            out.append(Collective("all-reduce (gradient shards, across replicas)", micro_batches, 0.0, across))
        return out
    gather_intra, gather_across = _spanning(gathered, nodes, gpus_per_node)
    reduce_intra, reduce_across = _spanning(reduced, nodes, gpus_per_node)
    return [
        Collective("all-gather (parameters)", gathers, gathers * gather_intra, gathers * gather_across),
        Collective(
            "reduce-scatter (gradients)", micro_batches, micro_batches * reduce_intra, micro_batches * reduce_across
        ),
    ]


def communication_plan(
    collectives: list[Collective],
    *,
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS,
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS,
) -> dict:
    """The JSON-able summary: each GPU's bytes each way per step within and across nodes, and
    the seconds they take at the given link rates (gigabits per second, each way, per GPU)."""
    for name, value in (("--intra-node-gbps", intra_node_gbps), ("--inter-node-gbps", inter_node_gbps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a number of Gb/s > 0, got {value!r}")
    intra = sum(c.intra_node_bytes for c in collectives)
    inter = sum(c.inter_node_bytes for c in collectives)
    intra_s = intra * 8 / (intra_node_gbps * 1e9)
    inter_s = inter * 8 / (inter_node_gbps * 1e9)
    return {
        "collectives": [
            {
                "name": c.name,
                "per_step": c.per_step,
                "intra_node_gb": c.intra_node_bytes / 1e9,
                "inter_node_gb": c.inter_node_bytes / 1e9,
            }
            for c in collectives
        ],
        "intra_node_gb": intra / 1e9,
        "inter_node_gb": inter / 1e9,
        "intra_node_gbps": float(intra_node_gbps),
        "inter_node_gbps": float(inter_node_gbps),
        "seconds": intra_s + inter_s,
        "intra_node_seconds": intra_s,
        "inter_node_seconds": inter_s,
    }


def format_communication(result: dict) -> str:
    """The plan's table of communication per GPU and step."""
    lines = [
        f"communication per GPU and step (ring collectives, each way; NVLink {result['intra_node_gbps']:.0f} Gb/s, "
        f"network {result['inter_node_gbps']:.0f} Gb/s per GPU):",
        f"  {'collective':<48} {'per step':>8} {'in node GB':>11} {'across GB':>10}",
    ]
    for c in result["collectives"]:
        lines.append(f"  {c['name']:<48} {c['per_step']:>8} {c['intra_node_gb']:>11.2f} {c['inter_node_gb']:>10.2f}")
    lines.append(
        f"  total {result['intra_node_gb']:.2f} GB in the node ({result['intra_node_seconds']:.2f} s) + "
        f"{result['inter_node_gb']:.2f} GB across nodes ({result['inter_node_seconds']:.2f} s) = at least "
        f"{result['seconds']:.2f} s per step if nothing overlaps with compute"
    )
    return "\n".join(lines)
