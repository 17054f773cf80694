"""SIGINT / SIGTERM for the `pipeline` command: stop cleanly, say one line, exit 130 / 143.

Why a handler of our own rather than Python's KeyboardInterrupt:
- typer turns a KeyboardInterrupt into ``Exit(130)``, which under ``standalone_mode=False`` is
  *returned*, not raised: the command exited 0 with the cache unfinished;
- a shell starts background jobs (``pipeline extract ... &`` in a script) with SIGINT ignored,
  so ``kill -INT`` did nothing and the run went on to the end;
- SIGTERM (``kill``, a batch scheduler's time limit) had no handler at all;
- ``except Exception`` blocks (a decoder crash must not stop a run) and libraries that catch
  KeyboardInterrupt must not be able to swallow the stop.

``install()`` (from the CLI's entry point) makes both signals raise ``Interrupted`` in the main
thread of the main process: a BaseException that no ``except Exception`` catches and that typer
and click leave alone, so every ``finally`` on the way out runs (the extraction's writer thread
finishes the shard it holds, DataLoader workers are shut down, an atomic checkpoint write removes
its temporary file) and the entry point prints ``LINE`` and exits 128 + the signal number.
Everything already committed (extracted shards, epoch checkpoints) stays, so rerunning the same
command resumes. A second signal while that cleanup runs exits at once, with the same line.

When the command is over (it returned, failed, or was stopped: its exit status is decided),
``restore(old, exiting=True)`` ignores both signals for the rest of the process's life. The
interpreter's shutdown still joins threads, runs atexit callbacks and frees torch's modules (a
few hundred milliseconds); CPython resets every Python-level handler to SIG_DFL part way through
it (``_PySignal_Fini``), so a SIGINT landing there killed a finished command with -2 and no line.
SIG_IGN is left in place by that reset, so the command exits with its own status. Called
in-process (the tests), ``restore(old)`` puts the previous handlers back instead.

A stop can be swallowed: when the signal lands while the main thread runs code whose exceptions
Python only reports (an at-fork callback such as logging's while a DataLoader worker starts, a
finaliser, a weakref callback), ``Interrupted`` went to ``sys.unraisablehook`` ("Exception ignored
in ...") and the run went on to exit 0. ``install()`` hooks that: the swallowed stop is delivered
again (``_thread.interrupt_main`` from a helper thread), so it raises at the next point where it
can propagate, and
``check()`` (called by the CLI once the command returns) turns a stop that still got lost into the
same line and exit status.

Two windows where raising at once does harm are held (``hold()`` / ``let_go()``, ``deferred()``):
the program's own imports before ``main`` runs (an ``Interrupted`` there escaped as a traceback,
exit 1), and the import of torch: a signal landing while torch's C++ initialisation calls back
into Python turned the exception into an uncaught C++ error, and the process aborted (SIGABRT,
exit -6, a "Python Stacktrace" dump; seen under load in the Ctrl-C test). While held, a signal is
recorded and raised when the window closes (a second one exits at once, with the line).

Forked DataLoader workers inherit the handler: there it ignores SIGINT (a terminal's Ctrl-C
reaches the whole process group; the main process stops the workers itself). Workers get
SIGTERM from torch's own handler. Stage two's loader workers (stages/data/loader.py) set their own
first thing: SIGINT ignored, SIGTERM the default action, since the inherited handler also ignores
SIGTERM, and a worker that ignores ``Process.terminate()`` kept the finished command from exiting.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import warnings

__all__ = ["Interrupted", "LINE", "install", "restore", "received", "exit_code", "check", "hold", "let_go",
           "deferred"]

LINE = "interrupted: rerun the same command to resume"

_main_pid: int | None = None
_received: int | None = None  # the first signal number this process got
_finished = False             # the command is over: a late signal changes nothing
_redeliver = False            # the last Interrupted was swallowed: the next call raises it again
_in_hook = False              # the main thread is inside _unraisable: a stop raised there is lost again
_previous_hook = None         # sys.unraisablehook before install()
_holding = 0                  # open hold() / deferred() windows: a signal is recorded, raised at let_go()
_pending: int | None = None   # the signal recorded while holding


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives (not an Exception on purpose)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    global _received, _redeliver, _pending
    if os.getpid() != _main_pid or _finished:  # a forked worker (the main process decides), or too late to stop
        return
    if _holding:
        if _pending is None and _received is None:
            _pending = signum  # raised when the window closes
            return
        _exit_now(_pending or _received or signum)
    if _redeliver:  # the first stop was swallowed (see _unraisable): raise it again, here
        if _in_hook:  # ...but not inside the hook itself: its redelivery comes once it has returned
            return
        _redeliver = False
        raise Interrupted(_received or signum)
    if _received is not None:  # second signal while stopping: stop now
        _exit_now(_received)
    _received = signum
    raise Interrupted(signum)


def _exit_now(signum: int) -> None:
    try:
        sys.stderr.write(LINE + "\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def hold() -> None:
    """Record a signal instead of raising it, until the matching ``let_go()``."""
    global _holding
    _holding += 1


def let_go() -> None:
    """Close a ``hold()``; the signal recorded meanwhile (if any) is raised now, here."""
    global _holding, _pending, _received
    _holding = max(0, _holding - 1)
    if not _holding and _pending is not None:
        signum, _pending = _pending, None
        if os.getpid() == _main_pid and not _finished:
            _received = signum
            raise Interrupted(signum)


@contextlib.contextmanager
def deferred():
    """A block a signal must not cut short (an import of a C++ extension): a stop waits for its end."""
    hold()
    try:
        yield
    finally:
        let_go()


def _unraisable(unraisable) -> None:
    """sys.unraisablehook: an Interrupted that Python could only report (raised inside an at-fork
    callback, a finaliser...) is delivered again instead of being lost."""
    global _redeliver, _in_hook
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted) and os.getpid() == _main_pid and not _finished:
        _redeliver = True
        # from another thread, once this hook has returned: the handler then runs at the main
        # thread's next check, outside the code that swallowed it. Raised in here it went to the
        # hook's own error report and the run went on (seen under load: the thread started below
        # fired while the main thread still waited in Thread.start)
        import threading

        _in_hook = True
        try:
            threading.Thread(target=_redeliver_after_hook, args=(exc.signum,), daemon=True).start()
        finally:
            _in_hook = False  # nothing after this in the hook lets a signal handler run
        return
    if _received is not None and os.getpid() == _main_pid:
        # a stop is under way: what the interrupted objects report as they are torn down (a
        # DataLoader iterator stopped half-built: "no attribute '_shutdown'") is its echo, not
        # news; the command ends with the one line
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def _redeliver_after_hook(signum: int) -> None:
    """Helper thread: wait for the main thread to leave _unraisable, then simulate the signal."""
    import time

    time.sleep(0.01)
    while _in_hook:
        time.sleep(0.005)
    _thread.interrupt_main(signum)


def install() -> dict:
    """Handle SIGINT and SIGTERM in this (main) process; returns the handlers it replaced. Called
    again in the same process inside a ``hold()`` (the entry point's, before ``main``), it keeps the
    hold and the signal recorded in it."""
    global _main_pid, _received, _finished, _redeliver, _previous_hook, _holding, _pending
    if _main_pid != os.getpid() or not _holding:
        _holding, _pending = 0, None
    _main_pid, _received, _finished, _redeliver = os.getpid(), None, False, False
    if sys.unraisablehook is not _unraisable:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, _handler)  # also when a shell started us with SIGINT ignored
    return old


def restore(old: dict, exiting: bool = False) -> None:
    """The command is over. ``exiting`` (the process ends next, with the status the command chose):
    ignore SIGINT and SIGTERM from now on, through the interpreter's shutdown. Otherwise (the CLI
    called in-process, as the tests do): put back what ``install`` replaced."""
    global _finished
    _finished = True
    if exiting:
        # a stop that lands inside zarr's event loop leaves a coroutine that never ran; the garbage
        # collector reports it during shutdown ("coroutine ... was never awaited"), after the one line
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    if not exiting and sys.unraisablehook is _unraisable:
        sys.unraisablehook = _previous_hook or sys.__unraisablehook__
    for sig, handler in old.items():
        if exiting:
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def received() -> int | None:
    """The signal number this process was stopped by, or None."""
    return _received


def check() -> None:
    """Raise the Interrupted of a signal that arrived but never propagated (swallowed by code that
    catches everything): the command was asked to stop, so it says so and exits 128 + the signal."""
    if _received is not None and not _finished:
        raise Interrupted(_received)


def exit_code() -> int:
    return 128 + (_received or signal.SIGINT)
