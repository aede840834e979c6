"""``python -m lomo_trainer.bench``: the benchmark command (run.py)."""
from .run import main

main()
