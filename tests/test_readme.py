"""The README as a newcomer reads it: its Python example runs, and every `pipeline` and `make`
command it prints names a command, options and make targets / variables that exist (a renamed
flag or target fails here, not in a reader's shell). The first-hour block runs end to end on a
reduced demo world under `-m slow`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, demo_args, run_cli

README = (ROOT / "README.md").read_text()


def _code_blocks() -> list[str]:
    """Indented blocks (4 spaces) and fenced blocks, as text."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    indented, block = [], []
    in_fence = False
    for line in README.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence and line.startswith("    ") and line.strip():
            block.append(line[4:])
        elif block:
            indented.append("\n".join(block))
            block = []
    if block:
        indented.append("\n".join(block))
    return fenced + indented


def _commands() -> list[list[str]]:
    """Every command line of the README's code blocks that runs `pipeline` or `make`, as tokens
    (comments and [optional] brackets dropped)."""
    out = []
    for block in _code_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            tokens = shlex.split(line.replace("[", " ").replace("]", " "))
            if tokens and (tokens[0] in ("pipeline", "make") or tokens[0].endswith("/pipeline")):
                out.append(tokens)
    return out


def test_the_readme_prints_commands_to_check():
    cmds = _commands()
    assert sum(c[0] == "make" for c in cmds) >= 5 and sum(c[0] != "make" for c in cmds) >= 15


def test_every_pipeline_command_and_option_in_the_readme_exists():
    import typer

    from pipeline.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for tokens in _commands():
        if tokens[0] == "make":
            continue
        cmd, words = group, tokens[1:]
        while hasattr(cmd, "commands") and words and not words[0].startswith("-"):
            assert words[0] in cmd.commands, f"README: `{' '.join(tokens)}`: no command '{words[0]}'"
            cmd, words = cmd.commands[words[0]], words[1:]
        assert not hasattr(cmd, "commands"), f"README: `{' '.join(tokens)}` names no command"
        options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for word in words:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in options, f"README: `{' '.join(tokens)}`: {cmd.name} has no {word}"
                checked += 1
    assert checked >= 20


def test_every_make_target_and_variable_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", makefile, flags=re.M))
    for tokens in _commands():
        if tokens[0] != "make":
            continue
        for word in tokens[1:]:
            if "=" in word:
                assert word.split("=", 1)[0] in variables, f"README: `{' '.join(tokens)}`: no make variable {word}"
            else:
                assert word in targets, f"README: `{' '.join(tokens)}`: no make target '{word}'"


def test_the_python_example_runs(demo_small, tmp_path):
    """The README's Python block, on a generated cache, in a fresh interpreter."""
    cache = tmp_path / "cache"
    run_cli(*demo_args(demo_small, cache, "--text", "none"), check=True)
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    script = f"CACHE = {str(cache)!r}\nRUN_DIR = {str(tmp_path / 'run')!r}\n" + code
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{demo_small.classes[0]} (12, 1, 8, ") and (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_the_first_hour_runs_as_printed(tmp_path):
    """The README's first-hour block, command by command, on the reduced demo world (DEMO_ARGS=--quick,
    artifacts under a temporary root)."""
    block = next(b for b in _code_blocks() if "make extract DATASET=demo" in b)
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "CLIPCACHE_ROOT": str(tmp_path / "art"), "PYTHONPATH": str(ROOT)}
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        tokens = shlex.split(line)
        if tokens[0] == "make":
            tokens = ["make", "-s", "-C", str(ROOT), f"VENV={venv}", "-o", f"{venv}/.installed",
                      f"DATA_ROOT={tmp_path / 'demo'}", "DEMO_ARGS=--quick", *tokens[1:]]
        else:
            tokens = [sys.executable, "-m", "pipeline.cli", *tokens[1:]]
        proc = subprocess.run(tokens, capture_output=True, text=True, env=env, timeout=1800, cwd=str(ROOT))
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
