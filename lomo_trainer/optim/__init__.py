"""The fused update engine: LOMO and AdaLomo (a package so that engine, clipping and rules each live in one module)."""
from ..adalomo import AdaLomo
from ..optimizer import LOMO, all_finite

__all__ = ["LOMO", "AdaLomo", "all_finite"]
