"""LOMOTrainer checkpoints on disk: layout, a manifest that proves a folder complete, and loading without pickle.

A checkpoint ``checkpoint-N/`` is a ``from_pretrained`` folder plus:
- ``lomo_state_rank{r}.pt``: LOMO's state (step, loss scaler, rounding generators) and the rank's RNG states;
- ``scheduler.pt``: the lr scheduler's state; ``trainer_state.json``: HF's TrainerState;
- ``lomo_manifest.json``, written last: every file's size (and SHA-256 up to ``HASH_LIMIT`` bytes) and the
  world size and global batch of the run that wrote it.

The folder is written as ``checkpoint-N.tmp`` and renamed when complete. Nothing is unpickled on load: state
files hold only tensors, numbers, strings and containers, and load with ``torch.load(weights_only=True)``. A file
that fails that, or that disagrees with the manifest, is named in a one-line ``CheckpointError``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
LOMO_STATE = "lomo_state_rank{}.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "lomo_manifest.json"
HASH_LIMIT = 256 * 2**20  # larger files (the weights) are checked by size: hashing 13 GB per save costs too much


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished ``checkpoint-N`` folders, oldest first (``*.tmp`` folders are unfinished and never count)."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, PREFIX + "*"))
             if (m := re.fullmatch(PREFIX + r"(\d+)", os.path.basename(p))) and os.path.isdir(p)]
    return [p for _, p in sorted(found)]


def last_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_unfinished(output_dir: str) -> list[str]:
    """Delete ``checkpoint-N.tmp`` / ``.old`` folders left by a crash mid-save (call on one rank)."""
    leftovers = [p for p in glob.glob(os.path.join(output_dir, PREFIX + "*"))
                 if re.fullmatch(PREFIX + r"\d+\.(tmp|old)", os.path.basename(p)) and os.path.isdir(p)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, **run) -> None:
    """Record every file of a finished checkpoint folder; written last, so its presence means complete."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST:
                continue
            size = os.path.getsize(path)
            files[rel] = {"size": size, **({"sha256": _sha256(path)} if size <= HASH_LIMIT else {})}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "run": run, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def kind(folder: str) -> str:
    """'lomo' (ours, with a manifest), 'lomo-legacy' (ours, written before manifests), 'hf' (a stock Trainer
    checkpoint) or 'unknown'."""
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return "lomo"
    if os.path.isfile(os.path.join(folder, LOMO_STATE.format(0))):
        return "lomo-legacy"
    if os.path.isfile(os.path.join(folder, TRAINER_STATE)):
        return "hf"
    return "unknown"


def problem(folder: str) -> str | None:
    """Why ``folder`` cannot be resumed from (one line naming the file), or None if it looks whole."""
    k = kind(folder)
    if k == "unknown":
        return f"{folder} is not a checkpoint (no {MANIFEST} or {TRAINER_STATE})"
    if k == "lomo":
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{os.path.join(folder, MANIFEST)} is unreadable ({type(e).__name__})"
        for rel, meta in files.items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            size = os.path.getsize(path)
            if size != meta["size"]:
                return f"{path} has {size} bytes, {meta['size']} were written: the file is truncated or altered"
            if "sha256" in meta and _sha256(path) != meta["sha256"]:
                return f"{path} does not match its checksum: the file is corrupt"
        return None
    try:  # legacy and stock checkpoints: at least the trainer state must parse
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"{os.path.join(folder, TRAINER_STATE)} is unreadable ({type(e).__name__})"
    return None


def resolve(resume, output_dir: str) -> str | None:
    """The folder to resume from. ``True``: the newest checkpoint in ``output_dir`` that is whole, warning about
    (and skipping) broken newer ones. A path: that folder, refused with one line if it is broken."""
    if not resume:
        return None
    if resume is True:
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-N folder: "
                                  "drop the flag to start afresh")
        for folder in reversed(candidates):
            why = problem(folder)
            if why is None:
                return folder
            logger.warning(f"skipping a broken checkpoint: {why}; falling back to an older one")
        raise CheckpointError(f"no complete checkpoint in {output_dir}; the newest: {problem(candidates[-1])}")
    folder = os.fspath(resume)
    if not os.path.isdir(folder):
        raise CheckpointError(f"resume_from_checkpoint={folder!r} is not a folder: pass a checkpoint-N folder or true "
                              "for the newest one in output_dir")
    why = problem(folder)
    if why is not None:
        raise CheckpointError(f"cannot resume from {folder}: {why}; pass an older checkpoint-N folder")
    return folder


def load_state(path: str):
    """Load a state file without running code from it; a bad file is named in one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; pass an older checkpoint-N folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be trusted
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be loaded as plain tensors and numbers ({type(e).__name__}: "
                              f"{reason[:160]}): it is corrupt or not written by LOMOTrainer") from None


def run_info(folder: str) -> dict:
    """The ``run`` record of the manifest (world size, global batch), or {} for older checkpoints."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return dict(json.load(f).get("run") or {})
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- RNG states as plain data
def rng_states() -> dict:
    import random

    import numpy as np
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(internal), gauss],
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype("int64")),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    import random

    import numpy as np
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype("uint32"),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
