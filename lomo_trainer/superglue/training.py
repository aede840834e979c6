"""Fine-tuning pieces: in-memory training data under a protocol, and trainers that evaluate by ranking.

``training_dataset`` tokenises each instance's gold candidate with the protocol's own ``encode`` -- the
function its evaluation scores candidates with -- so training and scoring see the same tokens, the same EOS
and the same truncation. ``epoch_eval_trainer`` makes a trainer class whose ``evaluate`` ranks candidates;
with ``eval_strategy="epoch"`` the Trainer calls it after every epoch and it keeps every result.
"""
from __future__ import annotations

from .. import ranking
from ..data import IGNORE_INDEX
from .protocols import get_protocol, gold_completion
from .tasks import get_task


def training_records(task: str, examples: list[dict], protocol: str = "standard") -> list[dict]:
    """``{"prompt", "completion"}`` per instance (MultiRC: per answer option), the completion its gold answer."""
    proto, name = get_protocol(protocol), get_task(task).name
    return [{"prompt": inst.context, "completion": gold_completion(proto, name, ex, inst)}
            for ex in examples for inst in proto.instances(name, ex)]


def training_dataset(task: str, examples: list[dict], tokenizer, max_length: int, protocol: str = "standard"):
    """A ``datasets.Dataset`` of input_ids/attention_mask/labels; the prompt's labels are -100."""
    import datasets

    proto = get_protocol(protocol)
    rows = []
    for record in training_records(task, examples, protocol):
        ctx, target = proto.encode(tokenizer, record["prompt"], record["completion"], max_length)
        if target:  # the paper's right cut can leave nothing to learn: such an example teaches nothing
            ids = ctx + target
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(ctx) + target})
    if not rows:
        raise ValueError(f"no {task} training example has a target left within max_length={max_length}.")
    return datasets.Dataset.from_list(rows)


def epoch_eval_trainer(trainer_cls):
    """``trainer_cls`` whose evaluate() runs ``ranking_eval(model) -> metrics`` and records it per epoch."""

    class RankingEvalTrainer(trainer_cls):
        def __init__(self, *args, ranking_eval, **kwargs):
            super().__init__(*args, **kwargs)
            self.ranking_eval, self.evaluations = ranking_eval, []

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # the stock evaluation loop's per-batch hook, between ranking batches: a signal need not wait for the
            # whole evaluation (LOMOTrainer stops every rank at the same batch there)
            with ranking.between_batches(lambda: self.callback_handler.on_prediction_step(
                    self.args, self.state, self.control)):
                metrics = self.ranking_eval(self.model)
            result = dict(metrics, epoch=round(self.state.epoch or 0.0, 4), step=self.state.global_step)
            self.evaluations.append(result)
            logged = {f"{metric_key_prefix}_{k}": v for k, v in result.items()
                      if isinstance(v, float) and k not in ("epoch",)}
            self.log(logged)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logged)
            return logged

    return RankingEvalTrainer


def select(evaluations: list[dict], metric_keys: tuple[str, ...], headline: str) -> dict:
    """A task's results: ``headline`` ("best": the first evaluation with the highest score, as the paper's
    strict ``>`` kept it; "last") on top, then ``best``, ``last`` and every ``epochs`` entry."""
    best = max(evaluations, key=lambda r: r["score"])  # max keeps the first of equals
    last = evaluations[-1]
    top = best if headline == "best" else last
    keep = (*metric_keys, "score", "epoch", "step")
    return {**top, "selected": headline, "best": {k: best[k] for k in keep}, "last": {k: last[k] for k in keep},
            "epochs": [{k: r[k] for k in keep} for r in evaluations]}
