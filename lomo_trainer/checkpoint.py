"""LOMOTrainer checkpoints on disk: layout, a manifest that proves a folder complete, and loading without pickle.

A checkpoint ``checkpoint-N/`` is a ``from_pretrained`` folder plus:
- ``lomo_state_rank{r}.pt``: LOMO's state (step, loss scaler, rounding generators) and the rank's RNG states;
- ``scheduler.pt``: the lr scheduler's state; ``trainer_state.json``: HF's TrainerState;
- ``lomo_manifest.json``, written last: every file's size (and SHA-256 up to ``HASH_LIMIT`` bytes) and the
  world size and global batch of the run that wrote it.

The folder is written as ``checkpoint-N.tmp`` and renamed when complete (``begin_save`` ... ``finish_save``). Nothing is unpickled on load: state
files hold only tensors, numbers, strings and containers, and load with ``torch.load(weights_only=True)``. A file
that fails that, or that disagrees with the manifest, is named in a one-line ``CheckpointError``.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil

import torch

from . import _hf, _zero, lora
from .errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
LOMO_STATE = "lomo_state_rank{}.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "lomo_manifest.json"
NO_WEIGHTS = ("{} has no *.safetensors weights (a DeepSpeed-only checkpoint?): consolidate it with DeepSpeed's "
              "zero_to_fp32.py or set stage3_gather_16bit_weights_on_model_save, then resume")
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


_LOCKS: dict[str, int] = {}  # output_dir (real path) -> the open descriptor holding its lock, per process


def lock_output_dir(output_dir: str) -> None:
    """Hold an exclusive lock on ``output_dir`` for the rest of this process (call on the main process): a second
    run in the same folder is refused instead of overwriting the first one's checkpoints. The lock is the kernel's
    ``flock`` on the folder itself (no lock file): it goes with the process, so a killed run never leaves it stuck.
    Taking it again in the same process is a no-op."""
    path = os.path.realpath(output_dir)
    if path in _LOCKS:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"output_dir={output_dir!r} is a file: pass a folder (it is created if missing)")
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(f"output_dir={output_dir!r} is in use by another running training run: wait for it to "
                              "finish (or stop it), or pick another output_dir") from None
    _LOCKS[path] = fd


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
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            return f"{os.path.join(folder, MANIFEST)} is unreadable ({type(e).__name__})"
        why = _manifest_problem(manifest)
        if why is not None:
            return f"{os.path.join(folder, MANIFEST)} is malformed: {why}"
        for rel, meta in manifest["files"].items():
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
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        return NO_WEIGHTS.format(folder)
    return None


# the manifest's run record: key -> (JSON type(s), what the message says)
RUN_RECORD = {"world_size": (int, "an integer >= 1"), "global_batch": (int, "an integer >= 1"),
              "learning_rate": ((int, float), "a number"), "lr_scheduler_type": (str, "a string")}


def _manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest's structure (it is input like any file: a TypeError must not escape)."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "'files' is not an object"
    for rel, meta in files.items():
        if not isinstance(meta, dict) or isinstance(meta.get("size"), bool) or not isinstance(meta.get("size"), int) \
                or not isinstance(meta.get("sha256", ""), str) or rel.startswith("/") or ".." in rel.split("/"):
            return f"files[{rel!r}] must be {{\"size\": <integer>, \"sha256\": <string>}} for a path inside the folder"
    run = manifest.get("run", {})
    if not isinstance(run, dict):
        return "'run' is not an object"
    for key, (types, what) in RUN_RECORD.items():
        if key in run:
            value = run[key]
            if isinstance(value, bool) or not isinstance(value, types) or \
                    (types is int and value < 1):
                return f"run.{key}={json.dumps(value)} must be {what}"
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
    """The ``run`` record of the manifest (world size, global batch, learning rate, schedule), or {} for older
    checkpoints; only the keys whose values have the right type (``problem`` refuses a malformed record)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return {}
    run = manifest.get("run") if isinstance(manifest, dict) else None
    if not isinstance(run, dict):
        return {}
    return {k: v for k, v in run.items() if k in RUN_RECORD and not isinstance(v, bool)
            and isinstance(v, RUN_RECORD[k][0])}


# ---------------------------------------------------------------- writing
def begin_save(final: str, is_main: bool) -> str:
    """The empty ``.tmp`` folder that becomes ``final`` once whole (made by the main process only)."""
    tmp = final + ".tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    return tmp


def save_rank_state(folder: str, rank: int, optimizer_state: dict) -> None:
    """This rank's LOMO state and RNG states: plain data, which loads with weights_only=True."""
    torch.save({"optimizer": optimizer_state, "rng": rng_states()}, os.path.join(folder, LOMO_STATE.format(rank)))


def abandon_save(tmp: str) -> None:
    """Remove the unfinished ``.tmp`` folder of a save that failed; the checkpoints before it stay."""
    shutil.rmtree(tmp, ignore_errors=True)


def finish_save(tmp: str, final: str, **run) -> None:
    """Main process, once every rank has written: the manifest goes last (only a whole folder has one), then the
    finished folder is swapped in; the old one goes only after that."""
    write_manifest(tmp, **run)
    old = final + ".old"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rotate(output_dir: str, limit: int | None, best: str | None) -> None:
    """Keep the newest ``limit`` checkpoints; the best counts as the newest, so it is never rotated out, and the
    newest stays too, for resuming (as in the stock Trainer)."""
    if not limit:
        return
    found = list_checkpoints(output_dir)
    if best in found:
        found.remove(best)
        found.append(best)
        limit = max(limit, 2)
    for path in found[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- reading
def load_rank_state(folder: str, rank: int) -> dict:
    """This rank's LOMO state file; rank 0's when resumed on more ranks (the scaler and step are shared). A rank
    beyond the world size the manifest records reads rank 0's too: a stray file there was never part of it."""
    path = os.path.join(folder, LOMO_STATE.format(rank))
    written_by = run_info(folder).get("world_size")
    if not os.path.isfile(path) or (written_by is not None and rank >= written_by):
        path = os.path.join(folder, LOMO_STATE.format(0))
    return load_state(path)


def load_weights(model, folder: str, with_lora: bool) -> None:
    """The ``*.safetensors`` weights of ``folder`` into ``model``, each rank writing its own shard under ZeRO-3.
    LOMO + LoRA: the base weights under the plain model's names, the adapters from peft's folder."""
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters())
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(NO_WEIGHTS.format(folder))
    names = {n: n for n in params}  # name in the files -> parameter name
    if with_lora:
        names = {lora.file_key(model, n): n for n in params}
        files += sorted(glob.glob(os.path.join(folder, lora.ADAPTER_FOLDER, "*.safetensors")))
    loaded = set()
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = names.get(key)
                    p = params.get(name)
                    if p is None:
                        continue
                    shape, expected = list(f.get_slice(key).get_shape()), list(_zero.full_shape(p))
                    if shape != expected:
                        raise CheckpointError(f"{path}: {key} has shape {shape} but the model's {name} has "
                                              f"{expected}: the checkpoint belongs to another model shape")
                    full = f.get_tensor(key)
                    if full.is_floating_point() and not torch.isfinite(full).all():
                        raise CheckpointError(f"{path}: {key} holds NaN or inf: the checkpoint is corrupt; pass an "
                                              "older checkpoint-N folder")
                    with torch.no_grad():
                        if _zero.is_zero3_param(p):
                            _zero.load_full_param_(p, full)
                        else:
                            p.copy_(full)
                    loaded.add(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0][:160]}): pass an "
                                  "older checkpoint-N folder") from None
    base = model.get_base_model() if with_lora else model
    missing = [n for n, p in params.items() if n not in loaded and
               not _hf.is_tied(base, lora.base_key(n) if with_lora else n)]
    if missing:
        raise CheckpointError(f"{folder} lacks weights for {missing[:3]}: it belongs to another model")


def load_stock_scheduler(folder: str, scheduler, groups: int, global_step: int) -> None:
    """A stock Trainer checkpoint's schedule: its scheduler state when it fits ours (the stock AdamW/SGD have two
    param groups, decay and no decay, LOMO one), else the same schedule advanced to the checkpoint's step."""
    try:
        state = load_state(os.path.join(folder, SCHEDULER))
    except CheckpointError:
        state = None
    ours = scheduler.state_dict()
    if isinstance(state, dict) and set(state) == set(ours) and len(state.get("base_lrs", ())) == groups:
        scheduler.load_state_dict(state)
    else:
        for _ in range(global_step):
            scheduler.step()


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
