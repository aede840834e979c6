"""Count host reads of tensor values (``item``, ``tolist``, ``float(t)``, ``bool(t)``...) made by lomo_trainer's own
code: on a GPU each one waits for the device, a host synchronisation. Reads by torch, transformers or DeepSpeed (a
model's forward) are theirs and not counted."""
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import lomo_trainer

_READS = {"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__"}
_PACKAGE = os.path.dirname(os.path.abspath(lomo_trainer.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...``; then ``reads.count`` and ``reads.where`` (file:line of each)."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH):  # torch's dispatch
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
                self.where.append(f"{os.path.relpath(frame.f_code.co_filename, _PACKAGE)}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))
