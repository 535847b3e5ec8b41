"""Ctrl-C reaches every process of the job: only the front end may act on it.

A shell's Ctrl-C, GNU timeout and systemd's default KillMode (control-group) signal the whole
process group, so SIGINT/SIGTERM arrive at the engine-core process and the EP ranks at the same
moment as at the front end. If a rank died of it, every stream in flight would fail ("EP rank 1
exited") instead of draining. So the engine's processes ignore both signals and follow the
front end's drain: it stops taking calls, lets those in flight finish, then tells the core to
stop, and the core stops its ranks. They still end if the front end vanishes (each watches its
parent) and are killed (SIGKILL) when the engine fails.

A spawned child starts a fresh interpreter, which would turn SIGINT into KeyboardInterrupt
while it imports torch, before its entry point could ignore it. Blocked signals survive
fork and exec, so the parent blocks both around the spawn (`spawning_signal_proof`); the
child's entry point ignores them and unblocks (`ignore_group_signals`), which drops any that
arrived meanwhile.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_group_signals() -> None:
    """For the entry point of an engine-core or rank process (its main thread)."""
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


@contextmanager
def spawning_signal_proof() -> Iterator[None]:
    """Processes started inside this block (by this thread) begin with SIGINT/SIGTERM blocked.
    In this process a signal that arrives meanwhile waits (in this thread) or goes to another
    thread: none is lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
