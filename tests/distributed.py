"""Multi-rank tests fork their ranks from this already-imported pytest process: see lomo_trainer.ranks."""
from lomo_trainer.ranks import run_ranks

__all__ = ["run_ranks"]
