"""``python -m lomo_trainer.superglue``: the SuperGLUE command (cli.py)."""
from .cli import main

main()
