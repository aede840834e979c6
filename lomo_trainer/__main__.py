"""``python -m lomo_trainer``: the lomo-train command (cli.py)."""
import sys

from .cli import main

sys.exit(main())
