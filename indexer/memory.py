"""Memory readings without psutil: the host's from /proc, a CUDA device's from torch.

Peak host memory is the kernel's high-water mark of resident set size (VmHWM), which writing "5"
to /proc/self/clear_refs resets (Linux ≥ 4.0): a build and its planner measure the same thing
the same way, so the planner's prediction can be checked against the build's record.
"""

from __future__ import annotations

from pathlib import Path


def _status_kb(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    """Resident bytes of this process now."""
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """The most resident bytes of this process since start or the last `reset_peak`."""
    return _status_kb("VmHWM") * 1024


def available() -> int:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable)."""
    return _status_kb("MemAvailable", "/proc/meminfo") * 1024


def reset_peak(device=None) -> None:
    """Start a new peak for the host (where the kernel allows it) and for `device` when it is CUDA."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or a kernel without it: the peak is since process start
        pass
    if device is not None and device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)


def peak_device(device) -> int | None:
    """Peak bytes torch allocated on a CUDA `device` since `reset_peak`; None on the CPU."""
    if device is None or device.type != "cuda":
        return None
    import torch
    return int(torch.cuda.max_memory_allocated(device))


def free_device(device) -> int | None:
    """Free bytes on a CUDA `device` now; None on the CPU."""
    if device is None or device.type != "cuda":
        return None
    import torch
    return int(torch.cuda.mem_get_info(device)[0])


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, MemoryError, or a RuntimeError from an allocator that ran out."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release(device) -> None:
    """Give a CUDA device's cached blocks back after an out-of-memory error."""
    if device is not None and device.type == "cuda":
        import torch
        torch.cuda.empty_cache()
