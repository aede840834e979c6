"""The examples run as their docstrings say on CPU, under torchrun: the HF script with LOMOTrainer swapped in trains,
evaluates and saves; the plain DeepSpeed loop's loss falls. TRL's examples are run by test_trl_launch.py.

One rank, not the docstrings' two: with two gloo ranks and LOMO's overlapped reductions, a rank can abort in C++
teardown after the script has finished ("terminate called without an active exception"; 3 runs in 45 of
hf_finetune.py, none in 20 with overlap_comm false, none in 12 for the stock Trainer). That is an open issue, and it
must not make this test flaky; the 2-rank training path itself is covered by the multirank tests."""
import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cpu_command(example: str) -> list[str]:
    """The example docstring's CPU line, with this environment's torchrun."""
    doc = ast.get_docstring(ast.parse((ROOT / "examples" / example).read_text()))
    line = next(ln.strip() for ln in doc.splitlines() if ln.strip().startswith("DS_ACCELERATOR=cpu torchrun"))
    words = shlex.split(line.split("  #")[0])
    assert words[:2] == ["DS_ACCELERATOR=cpu", "torchrun"], line
    i = words.index("--nproc_per_node")  # one rank (the module docstring says why)
    words[i + 1] = "1"
    return [str(Path(sys.executable).parent / "torchrun"), *words[2:]]


def run(cmd: list[str]) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_hf_finetune_trains_evaluates_and_saves():
    out = run(cpu_command("hf_finetune.py") + ["--max_steps", "4"])
    assert re.search(r"'eval_loss': \d", out), out[-2000:]
    assert (ROOT / "outputs" / "hf_finetune" / "config.json").is_file()


def test_deepspeed_loop_loss_falls():
    out = run(cpu_command("deepspeed_loop.py"))
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", out)]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
