"""The fused update engine and its update rules: ``LOMO`` (SGD), ``AdaLomo``, and the protocol for new rules.

- ``engine``    hooks, reductions, passes, the step's one host sync, skip accounting, state (``LOMO``)
- ``sinks``     where a reduced shard goes in each pass: norm, accumulation buffer, update
- ``clipping``  unscale x global x per-parameter coefficient, and the value clamp, for every rule
- ``rules``     the ``UpdateRule`` protocol, ``StepContext`` and LOMO's ``SGD``
- ``adalomo``   ``AdaLomoRule`` and the ``AdaLomo`` optimizer
- ``adapters``  LOMO + LoRA: the adapters' torch-optimizer rule
- ``tensors``   the finite check, update-sized slices, the guarded write
"""
from .adalomo import AdaLomo, AdaLomoRule
from .clipping import Clipping
from .engine import LOMO
from .rules import SGD, StepContext, UpdateRule
from .tensors import GuardedWriter, all_finite, chunks, spans, to_weight_device

__all__ = ["LOMO", "AdaLomo", "AdaLomoRule", "SGD", "UpdateRule", "StepContext", "Clipping", "GuardedWriter",
           "all_finite", "chunks", "spans", "to_weight_device"]
