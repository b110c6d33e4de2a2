"""Peak memory of a piece of work, on CUDA (allocator statistics) or CPU (peak resident set)."""

import re
from collections.abc import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def peak_memory_during(fn: Callable[[], object], device: torch.device | str) -> tuple[object, int]:
    """Run fn(); return its result and the peak bytes allocated above what was allocated before.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux only): the process's peak resident set
    (VmHWM), reset through /proc/self/clear_refs; large tensors are mmap-backed, so freed
    memory leaves the resident set and the peak is the live high-water mark.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_bytes("VmRSS")
    except OSError as error:
        raise RuntimeError(f"CPU peak memory needs Linux /proc: {error}") from error
    result = fn()
    return result, max(0, _status_bytes("VmHWM") - before)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's peak resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset_peak_memory: allocated bytes on CUDA, resident set on CPU
    (the whole process's, so it includes the model and the interpreter), 0 where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _status_bytes("VmHWM")
    except (OSError, AttributeError):
        return 0
