"""Host syncs per training step (issue 24 item 6): the one-pass route makes at most one.

A sync is an op that needs a device value on the host (its size or its value): on a GPU it waits
for everything queued before it, so the host stops issuing work. On the CPU machine every tensor
is on the host, so the test TAGS what would live on the device: the parameters, their gradients
and optimizer states, the batch after step.to_device, and everything computed from them (a
TorchDispatchMode propagates the tag through every ATen op). A syncing op on a tagged tensor, or a
.tolist() / .cpu() / .numpy() / .item() of one, is counted.
"""

import traceback
from pathlib import Path

import pytest
import torch
from helpers import SYNCING_OPS, tiny_config
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastnpo.train import step, train
from fastnpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TAG = "_fastnpo_on_device"


def tag(tree):
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            setattr(leaf, TAG, True)
    return tree


def tagged(tree) -> bool:
    return any(isinstance(leaf, torch.Tensor) and getattr(leaf, TAG, False) for leaf in pytree.tree_leaves(tree))


def caller() -> str:
    """ "transformers" when the sync comes from inside transformers' code, else "fastnpo"."""
    inside = any("/transformers/" in frame.filename for frame in traceback.extract_stack())
    return "transformers" if inside else "fastnpo"


class DeviceSyncs(TorchDispatchMode):
    """Counts the syncing ops on tagged tensors, tagging every op's outputs from tagged inputs."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        on_device = tagged((args, kwargs))
        if on_device and func.overloadpacket in SYNCING_OPS:
            self.syncs.append((caller(), str(func.overloadpacket)))
        out = func(*args, **(kwargs or {}))
        return tag(out) if on_device else out


def syncs_per_step(tiny, out, monkeypatch, **extra) -> list[list[str]]:
    """The syncs of each step after the first (whose optimizer states are created in it)."""
    per_step = []
    original_step, original_to_device = Trainer.step, step.to_device

    def to_device(tree, device):  # a tagged COPY: the host originals stay untagged
        moved = original_to_device(tree, device)
        return tag(pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, moved))

    def counted_step(trainer, batch):
        # Optimizer states on the device; their step counts stay on the host (torch's default
        # unless capturable / fused), so reading them is no sync.
        states = [{k: v for k, v in state.items() if k != "step"} for state in trainer.optimizer.state.values()]
        tag([*trainer.model.wrapper.parameters(), *trainer.model.wrapper.buffers(), *states])
        counter, host_reads = DeviceSyncs(), []
        with pytest.MonkeyPatch.context() as reads:
            for method in ("tolist", "cpu", "numpy", "item"):
                unpatched = getattr(torch.Tensor, method)

                def read(self, *args, _unpatched=unpatched, _name=method, **kwargs):
                    if getattr(self, TAG, False):
                        host_reads.append((caller(), _name))
                    return _unpatched(self, *args, **kwargs)

                reads.setattr(torch.Tensor, method, read)
            with counter:
                result = original_step(trainer, batch)
        per_step.append(counter.syncs + host_reads)
        return result

    monkeypatch.setattr(Trainer, "step", counted_step)
    monkeypatch.setattr(step, "to_device", to_device)
    extra = {"run.export": False, "optim.max_steps": 3, **extra}
    train(tiny_config(tiny, out, **extra))
    assert len(per_step) == 3
    return per_step[1:]


PACKED = {"data.packing": True, "data.pack_tokens": 128}


@pytest.mark.parametrize(
    ("method", "grad_accum", "layout"),
    [
        ("npo_rt", 2, {}),
        ("simnpo", 1, PACKED),
        ("graddiff", 2, PACKED),
        ("wga", 2, {}),
        ("satimp", 1, PACKED),
        ("ceu", 2, PACKED),
        ("idkdpo", 2, {}),
    ],
)
def test_the_one_pass_step_syncs_once(tiny, tmp_path, monkeypatch, method, grad_accum, layout):
    """fastnpo's own syncs: one per step (StepResult.collect: the statistics and the gradient norm
    in one copy). transformers' mask code adds its own per forward (masking_utils: padded rows'
    attention mask, _ignore_causal_mask_sdpa, two; packed rows' position_ids,
    find_packed_sequence_indices, one), outside fastnpo's reach: counted, bounded."""
    extra = {"method.name": method, "model.loss_design": "one_pass", "optim.grad_accum": grad_accum, **layout}
    for syncs in syncs_per_step(tiny, tmp_path / "run", monkeypatch, **extra):
        assert [s for s in syncs if s[0] == "fastnpo"] == [("fastnpo", "tolist")]
        assert 0 < len([s for s in syncs if s[0] == "transformers"]) <= 2 * grad_accum


def test_the_count_sees_a_sync_in_the_loss(tiny, tmp_path, monkeypatch):
    """The counter is not blind: a loss that reads a device value (float(...)) adds a sync."""
    from fastnpo.methods import npo

    original = npo.NPO.forget_terms

    def reads_the_value(self, config, x):
        terms = original(self, config, x)
        float(terms["npo"].value)
        return terms

    monkeypatch.setattr(npo.NPO, "forget_terms", reads_the_value)
    extra = {"method.name": "npo_rt", "model.loss_design": "one_pass", **PACKED}
    for syncs in syncs_per_step(tiny, tmp_path / "run", monkeypatch, **extra):
        assert ("fastnpo", "aten._local_scalar_dense") in syncs
