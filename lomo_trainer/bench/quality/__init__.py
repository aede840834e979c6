"""Quality benchmark: fine-tune a real pretrained model (SmolLM2-135M-Instruct) with each optimizer, score held out.

Modules: ``data`` (the stdlib docstring task), ``model`` (fetch and convert the model), ``scoring`` (held-out
loss, multiple-choice accuracy), ``variants`` (the rows), ``runner`` (one process per run), ``report``.
Run ``python -m lomo_trainer.bench.quality`` or ``scripts/quality.sh``; results in docs/quality.md.
"""
