"""``python -m lomo_trainer.planner``: the memory planner's command (the code lives in lomo_trainer.bench.planner)."""
from .bench.planner import main

if __name__ == "__main__":
    main()
