"""Every shell command quoted in README.md runs, in a dry or tiny form, so a renamed flag, file or config breaks the
build: the default run for 2 steps, the test suite's collection, the planner lines whole, the 8-GPU launches'
configs through lomo-train's start-up checks, and the accelerate launch's YAML and script arguments. The commands
quoted in docs/ (benchmarks that take minutes to hours) are checked dry: their flags against the tool's --help, and
every file they name."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def readme_commands(text: str) -> list[str]:
    """The lines of the indented code blocks outside ``` fences, continuation lines joined, comments dropped."""
    commands, fenced, in_block, after_blank = [], False, False, True
    for line in text.splitlines():
        if line.startswith("```"):
            fenced, in_block, after_blank = not fenced, False, False
        elif not fenced and line.startswith("    ") and (in_block or after_blank):
            code = re.sub(r"\s+#\s.*$", "", line.strip())
            if in_block and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1].rstrip() + " " + code
            else:
                commands.append(code)
            in_block = True
        elif not line.strip():
            after_blank = True
        else:
            in_block = after_blank = False
    return commands


def run(cmd: list[str] | str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def default_run(command: str, tmp_path) -> None:
    out = run(["bash", "scripts/default_run.sh", "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert "held-out accuracy:" in out.stdout + out.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def suite_collects(command: str, tmp_path) -> None:
    out = run(["bash", "scripts/test.sh", "--collect-only", "-p", "no:cacheprovider"])  # test.sh passes -q
    assert re.search(r"\d+ tests? collected", out.stdout), out.stdout[-500:]


def planner_lines(commands: list[str], tmp_path) -> None:
    """The ``P=...`` line with the loops under it, as one bash script: every invocation prints its figures."""
    out = run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)])
    loops = sum(len(re.search(r"for m in (.*?); do", c).group(1).split()) if c.startswith("for ") else 1
                for c in commands[1:])
    assert out.stdout.count("verdict:") + out.stdout.count("clip_mode auto ->") >= loops


def run_config_launch(command: str, tmp_path, monkeypatch) -> None:
    """The launcher (if any) is installed and the run config passes lomo-train's start-up checks for as many
    processes as it starts (one without a launcher)."""
    from transformers import training_args

    from lomo_trainer import cli, config

    # a GPU config checked on a CPU: only the device's dtype support is the GPU's to answer
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setattr(config, "_check_device_dtype", lambda fp16, bf16: None)
    words = shlex.split(command)
    module = words[words.index("--module" if "--module" in words else "-m") + 1]
    assert importlib.util.find_spec(module + ".__main__"), module
    monkeypatch.chdir(ROOT)
    if words[0] == "deepspeed":
        assert (VENV_BIN / "deepspeed").is_file(), "the deepspeed launcher is not installed in the environment"
        monkeypatch.setenv("WORLD_SIZE", words[words.index("--num_gpus") + 1])
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_args, targs, lomo = cli.parse([words[-1], "--output_dir", str(tmp_path / "out")])
    cli.prevalidate(targs, lomo)
    cli.precheck_run(run_args, targs)


def accelerate_launch(command: str, tmp_path, monkeypatch) -> None:
    """accelerate reads the YAML (DeepSpeed, its JSON present) and the script's parser takes the arguments."""
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers import HfArgumentParser

    words = shlex.split(command)
    config = load_config_from_file(str(ROOT / words[words.index("--config_file") + 1]))
    assert config.distributed_type == "DEEPSPEED"
    assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).is_file()
    script = next(w for w in words if w.endswith(".py"))
    spec = importlib.util.spec_from_file_location("readme_script", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = words[words.index(script) + 1:]
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    parser = HfArgumentParser((module.ScriptArguments, module.SFTConfig))
    script_args, _ = parser.parse_args_into_dataclasses(args + ["--use_cpu", "true", "--bf16", "false"])
    assert script_args.model_name_or_path == args[args.index("--model_name_or_path") + 1]


RULES = [  # (pattern, runner); a README command no rule matches fails the test
    (r"bash scripts/default_run\.sh", default_run),
    (r"bash scripts/test\.sh", suite_collects),
    (r"deepspeed --num_gpus 8 --module lomo_trainer configs/\S+\.json", run_config_launch),
    (r"python -m lomo_trainer configs/\S+\.json", run_config_launch),
    (r"accelerate launch --config_file \S+ examples/\S+\.py .*", accelerate_launch),
]


def cases() -> list:
    commands = readme_commands((ROOT / "README.md").read_text())
    out, planner = [], []
    for command in commands:
        if command.startswith("P=") and planner:  # the next table's planner lines
            out.append(pytest.param(planner_lines, planner, id=f"planner-{len(out)}"))
            planner = []
        if command.startswith("P=") or "$P" in command:
            planner.append(command)
            continue
        if planner:
            out.append(pytest.param(planner_lines, planner, id=f"planner-{len(out)}"))
            planner = []
        runner = next((r for pattern, r in RULES if re.fullmatch(pattern, command)), None)
        out.append(pytest.param(runner, command, id=command[:60]))
    if planner:
        out.append(pytest.param(planner_lines, planner, id=f"planner-{len(out)}"))
    return out


def test_readme_quotes_the_commands_this_test_knows():
    """The extraction finds the set-up commands, planner lines and launches; none is left without a rule."""
    found = cases()
    assert sum(c.values[0] is planner_lines for c in found) == 2
    assert {c.values[0] for c in found} >= {default_run, suite_collects, run_config_launch, accelerate_launch}
    unmatched = [c.values[1] for c in found if c.values[0] is None]
    assert not unmatched, f"README commands with no rule in tests/test_readme_commands.py RULES: {unmatched}"


@pytest.mark.parametrize("runner,command", [c for c in cases() if c.values[0] is not None])
def test_readme_command_runs(runner, command, tmp_path, monkeypatch):
    if runner in (run_config_launch, accelerate_launch):
        runner(command, tmp_path, monkeypatch)
    else:
        runner(command, tmp_path)


# ---------------------------------------------------------------- the commands quoted in docs/ and configs/ READMEs
DOCS = [*sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("README.md"))]
TOOL = re.compile(r"python -m (lomo_trainer[\w.]*)|python (scripts/\w+\.py)")
PATH = re.compile(r"^(configs|scripts|examples|tests|lomo_trainer)/[\w./-]+$")


def doc_segments() -> list[tuple[str, str, str]]:
    """(doc, tool, the tool's part of the command) for every python tool invocation the docs quote, shell variables
    defined in the same doc (``P="..."``) substituted."""
    out = []
    for path in DOCS:
        variables = {}
        for command in readme_commands(path.read_text()):
            if m := re.fullmatch(r'(\w+)="(.*)"', command):
                variables[m.group(1)] = m.group(2)
                continue
            for name, value in variables.items():
                command = re.sub(rf"\${name}\b", value, command)
            for m in TOOL.finditer(command):
                segment = re.split(r";|\bdone\b", command[m.end():])[0]
                out.append((path.name, m.group(1) or m.group(2), segment))
    return out


def help_text(tool: str, segment: str) -> str:
    words = segment.split()
    sub = words[0] if tool == "lomo_trainer.superglue" and words and not words[0].startswith("-") else None
    cmd = [sys.executable, *(["-m", tool] if not tool.endswith(".py") else [tool]), *([sub] if sub else []), "--help"]
    return run(cmd, timeout=300).stdout


def test_docs_commands_name_real_flags_and_files():
    """Each quoted tool's flags are in its --help, and every file or config a doc command names exists."""
    helps, missing = {}, []
    segments = doc_segments()
    assert {tool for _, tool, _ in segments} >= {"lomo_trainer.planner", "lomo_trainer.bench", "lomo_trainer.superglue"}
    for doc, tool, segment in segments:
        key = (tool, segment.split()[0] if tool == "lomo_trainer.superglue" else None)
        if key not in helps:
            helps[key] = help_text(tool, segment)
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", segment):
            if flag not in helps[key]:
                missing.append(f"{doc}: {tool} {flag}")
    for path in DOCS + [ROOT / "README.md"]:
        for command in readme_commands(path.read_text()):
            for word in re.findall(r"[\w./-]+", command):
                if PATH.match(word) and not (ROOT / word).exists():
                    missing.append(f"{path.name}: no file {word}")
    assert not missing, missing
