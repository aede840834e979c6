"""Peak memory of this process on its device: CUDA allocator statistics, or resident set size on CPU.

On CPU the figure is RSS (VmHWM in /proc/self/status), reset with ``/proc/self/clear_refs`` (Linux >= 4.0),
the CPU analogue of ``torch.cuda.reset_peak_memory_stats``. glibc's malloc is told to map every block of 64 KiB
and more on its own, so memory that torch frees goes back to the OS and RSS follows live tensors instead of
the heap's high-water mark (its default threshold grows up to 32 MiB and keeps freed blocks in the heap).
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: peak RSS needs Linux")


def tune_malloc() -> None:
    """Make RSS track live tensors (call once in a fresh worker, before any tensor is made)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # a fixed value also turns off glibc's dynamic threshold
        libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):  # not glibc: RSS is then an upper bound, as documented
        pass


class MemoryMeter:
    """``reset()`` then ``peak()``: bytes at the high-water mark since the reset. ``current()`` for baselines."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def file_backed(self) -> int:
        """CPU: resident file-backed pages (library code faulted in on first use); 0 on CUDA."""
        return 0 if self.cuda else _status_kib("RssFile") * 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {"peak": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved": torch.cuda.max_memory_reserved(self.device)}
        return {"peak": _status_kib("VmHWM") * 1024, "peak_reserved": None}
