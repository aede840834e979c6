"""Multi-rank tests fork their ranks from this already-imported pytest process: see lomo_trainer.local_ranks."""
from lomo_trainer.local_ranks import run_ranks

__all__ = ["run_ranks"]
