"""Ctrl-C never lands inside a study's storage call.

Python raises KeyboardInterrupt at whatever bytecode the main thread is running when SIGINT arrives.
Inside Optuna's storage (SQLAlchemy over sqlite3) that can be between a write and its COMMIT: the
connection is left holding the database's write lock, Optuna then marks the interrupted trial FAIL
through another connection of the same process, and that commit waits out SQLite's busy timeout
(60 s) before the process can exit. Seen as an intermittent hang of Ctrl-C under load.

:data:`GATE` holds SIGINT and SIGTERM (which the CLI turns into KeyboardInterrupt too) while a storage
method runs in the main thread, and delivers them to the handler that was installed before it (the
default raises KeyboardInterrupt) as soon as the call returns. The study's storage is wrapped by
:func:`gated` and the signal handlers are installed by :meth:`InterruptGate.installed` around the
study. Storage calls from other threads (PostgreSQL heartbeats, the web app's jobs, which cancel
cooperatively) are not held; signal handlers only ever run in the main thread.
"""

from __future__ import annotations

import functools
import signal
import threading
import types
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class InterruptGate:
    """Holds the signals of :data:`SIGNALS` while :meth:`closed` blocks run, once :meth:`installed`."""

    def __init__(self):
        self.depth = 0
        self.pending: tuple[int, object] | None = None
        self.previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        if self.depth:
            self.pending = (signum, frame)
            return
        self._deliver(signum, frame)

    def _deliver(self, signum: int, frame) -> None:
        previous = self.previous.get(signum, signal.default_int_handler)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and signum != signal.SIGINT:  # the default action (SIGTERM: exit)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route the signals through the gate for the block (main thread only: elsewhere a no-op)."""
        if not _main_thread() or self.previous:  # another thread, or already installed further up
            yield
            return
        self.previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.previous, self.pending = {}, None

    @contextmanager
    def closed(self) -> Iterator[None]:
        """A block no signal interrupts; one that arrived meanwhile is delivered when it ends."""
        if not _main_thread():
            yield
            return
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, frame = self.pending
                self.pending = None
                self._deliver(signum, frame)


GATE = InterruptGate()


def gated(storage_class: type) -> type:
    """A subclass of an Optuna storage class (RDBStorage) whose every method call runs inside
    ``GATE.closed()``, private ones included (Optuna's cache reads through ``_get_trials``)."""

    class Gated(storage_class):
        def __getattribute__(self, name: str):
            attr = super().__getattribute__(name)
            if name.startswith("__") or not isinstance(attr, types.MethodType):  # methods only (not scoped_session)
                return attr

            @functools.wraps(attr)
            def call(*args, **kwargs):
                with GATE.closed():
                    return attr(*args, **kwargs)

            return call

    Gated.__name__ = Gated.__qualname__ = f"Gated{storage_class.__name__}"
    return Gated


__all__ = ["GATE", "InterruptGate", "gated"]
