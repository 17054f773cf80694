"""A SIGINT that lands while the interpreter shuts down, after a command finished, leaves the
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
    "console script": "from pipeline.cli import main\nmain()\n",  # what `pipeline` (pyproject's script) runs
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
