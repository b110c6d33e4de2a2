"""Host-to-device copies that do not wait for the device."""

import torch


def to_device(tree, device: torch.device):
    """Tensors of a dict / tuple (None kept) on `device`; on CUDA through pinned memory without
    blocking, so that the copies do not wait for the GPU to drain (a plain .to() from pageable
    memory syncs)."""
    if isinstance(tree, dict):
        return {key: to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_device(value, device) for value in tree)
    if tree is None or tree.device == device:
        return tree
    if device.type == "cuda":
        return tree.pin_memory().to(device, non_blocking=True)
    return tree.to(device)
