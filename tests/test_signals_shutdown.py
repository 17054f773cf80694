"""Signals at awkward moments. A SIGINT that lands while the interpreter shuts down, after a command finished, leaves the
command's own exit status and output (issue 10: it killed the process with -2 and no line).

The signal is sent from inside the process at two fixed moments of the shutdown, so the test does
not depend on timing: from an atexit callback, and from a finaliser that runs while the modules
are torn down, after CPython has reset every Python-level signal handler to the default action
(an object in a ``_``-name of the main module, which is cleared first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

_PRELUDE = """
import atexit, os, signal, sys
class Late:
    def __init__(self, sig):
        self.kill, self.pid, self.sig = os.kill, os.getpid(), sig
    def __del__(self):
        self.kill(self.pid, self.sig)
"""

MOMENTS = {
    # while atexit callbacks run
    "atexit": "atexit.register(os.kill, os.getpid(), signal.{sig})\n",
    # while the main module is cleared, after the interpreter's signal finalisation
    "teardown": "_late = Late(signal.{sig})\n",
}
ENTRIES = {
    "console script": "from pipeline.entry import main\nmain()\n",  # what `pipeline` (pyproject's script) runs
    "python -m": "import runpy\nsys.argv[0] = 'pipeline.cli'\nrunpy.run_module('pipeline.cli', run_name='__main__')\n",
}


def _run(entry: str, moment: str, sig: str, *args: str) -> subprocess.CompletedProcess:
    code = _PRELUDE + MOMENTS[moment].format(sig=sig) + ENTRIES[entry]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_a_finished_command_keeps_its_status_when_a_signal_lands_at_shutdown(tmp_path, entry, moment):
    ok = _run(entry, moment, "SIGINT", "cache", "ls", str(tmp_path))
    assert ok.returncode == 0, (ok.returncode, ok.stderr[-2000:])
    assert "no caches under" in ok.stdout and ok.stderr == ""
    bad = _run(entry, moment, "SIGINT", "cache", "info", str(tmp_path / "missing"))  # a user error: exit 2
    assert bad.returncode == 2, (bad.returncode, bad.stderr[-2000:])
    assert bad.stderr.strip().splitlines() == [f"error: no cache at {tmp_path / 'missing'}"]


def test_sigterm_at_shutdown_too(tmp_path):
    proc = _run("console script", "teardown", "SIGTERM", "cache", "ls", str(tmp_path))
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr[-2000:])


def test_in_process_calls_get_their_handlers_back(tmp_path):
    """The tests call the CLI in-process: after it, the caller's handlers are in place again."""
    from pipeline.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    main(["cache", "ls", str(tmp_path)])
    assert {s: signal.getsignal(s) for s in before} == before


# ----------------------------------------------------------------------------- a stop Python swallowed
_SWALLOW = """
import os, signal, sys, time
from pipeline import signals
signals.install()
# the signal lands inside an at-fork callback (as logging's when a DataLoader worker starts), whose
# exceptions Python only reports: the Interrupted raised there was lost and the run went on
def _after_fork():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10):  # Python code after the signal: its handler runs here, inside the callback
        pass
os.register_at_fork(after_in_parent=_after_fork)
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:  # the run goes on: the stop must arrive within it
        pass
    print("not stopped")
except signals.Interrupted as exc:
    print("stopped", exc.exit_code)
"""


def test_a_stop_raised_inside_an_at_fork_callback_is_delivered_again():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SWALLOW], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "stopped 130", (proc.stdout, proc.stderr[-2000:])
    assert proc.stderr == ""  # no "Exception ignored in ..." report


def test_a_stop_that_code_swallowed_is_still_one_line_and_130():
    """Code that catches everything ate the Interrupted: check() (the CLI calls it when the
    command returns) raises it again."""
    code = """
import os, signal
from pipeline import signals
signals.install()
try:
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))
except BaseException:
    pass
try:
    signals.check()
    print("lost")
except signals.Interrupted as exc:
    print("stopped", exc.exit_code)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "stopped 130", (proc.stdout, proc.stderr[-2000:])


# A signal while the program is still importing its modules (typer's, the start; torch's, a
# second or twenty under load). Sent from an import hook at the first import of the module named,
# so the moment is exact. It used to escape as a traceback (exit 1) from `python -m`, and as a
# KeyboardInterrupt traceback from the console script, which imported everything before
# installing the handler; a stop inside torch's C++ initialisation aborted the process (-6).
_DURING_IMPORT = """
import builtins
_real_import = builtins.__import__
def _hooked(name, *args, **kwargs):
    if name == "{module}" and not getattr(_hooked, "fired", False):
        _hooked.fired = True
        os.kill(os.getpid(), signal.{sig})
    return _real_import(name, *args, **kwargs)
builtins.__import__ = _hooked
"""


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("module,sig,command", [("typer", "SIGINT", "cache ls"), ("torch", "SIGTERM", "heads"),
                                                ("zarr", "SIGINT", "cache ls")])
def test_a_signal_during_the_imports_is_the_one_line(tmp_path, entry, module, sig, command):
    # `cache ls` imports no torch; `heads` does, up front, where a signal waits for the import to finish
    code = _PRELUDE + _DURING_IMPORT.format(module=module, sig=sig) + ENTRIES[entry]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = command.split() + ([str(tmp_path)] if command == "cache ls" else [])
    got = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=300)
    assert got.returncode == 128 + getattr(signal, sig), (got.returncode, got.stderr[-2000:])
    assert got.stderr.strip().splitlines() == ["interrupted: rerun the same command to resume"]
    assert got.stdout.strip() == ""  # stopped before the command ran


def test_the_console_script_is_the_entry_these_tests_run():
    """ENTRIES["console script"] stands for what pip's `pipeline` script calls: keep them one."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pipeline"] == "pipeline.entry:main"
    assert "from pipeline.entry import main" in ENTRIES["console script"]
