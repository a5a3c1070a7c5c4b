"""Long work off the request thread: a :class:`Job` runs one function in a thread of its own with a
:class:`Progress` reporter (the pipeline's ``run.Reporter`` interface) that the page polls, and that
raises :class:`Cancelled` at the next progress step once the user cancels. The pipeline writes its
output only at the end, atomically, so a cancelled run leaves no output directory.

One job at a time per :class:`Workspace` (one per app): a second tab that starts a run while one is
going gets an error saying so, instead of a second run competing for the same CPU, memory or output.
This module knows nothing of Gradio.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ObliteratusError
from ..run import Reporter


class Cancelled(ObliteratusError):
    """The user cancelled the run."""


class Busy(ObliteratusError):
    """Another run of this app is in progress."""


@dataclass
class Progress(Reporter):
    """What the page shows while a job runs: the stage, the current task's count and a log."""

    cancel: threading.Event = field(default_factory=threading.Event)
    stage_name: str = ""
    task_label: str = ""
    done_n: int = 0
    total: int = 0
    lines: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled: the run stopped and nothing was written")

    def stage(self, name: str) -> None:
        self.check()
        self.stage_name, self.task_label, self.done_n, self.total = name, "", 0, 0
        self.lines.append(name.upper())

    def task(self, label: str, total: int) -> Callable[[int], None]:
        self.check()
        self.task_label, self.done_n, self.total = label, 0, total

        def advance(n: int) -> None:
            self.done_n += n
            self.check()

        return advance

    def done(self, name: str, seconds: float) -> None:
        self.lines.append(f"  {name} done in {seconds:.1f}s")

    def status(self) -> str:
        if not self.stage_name:
            return "starting"
        task = f" · {self.task_label} {self.done_n}/{self.total}" if self.task_label else ""
        return f"{self.stage_name.upper()}{task}"


@dataclass
class Job:
    """`fn(progress)` in a daemon thread; `result` or `error` (a message, as the CLI prints it) at the end."""

    fn: Callable[[Progress], Any]
    progress: Progress = field(default_factory=Progress)
    result: Any = None
    error: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> "Job":
        self.thread = threading.Thread(target=self._run, daemon=True, name="obliteratus-ui-job")
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.fn(self.progress)
        except ObliteratusError as err:  # the user's to fix: the CLI's one line
            self.error = f"error: {err}"
        except Exception as err:  # a bug: say what and where, keep the app alive
            self.error = f"internal error: {type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def cancel(self) -> None:
        self.progress.cancel.set()


class Workspace:
    """The app's state shared by every tab: the job in progress and the last finished run."""

    def __init__(self):
        self.lock = threading.Lock()  # the job and the last run
        self.chat_lock = threading.Lock()  # one chat answer at a time (the slider rewrites the edited weights)
        self.job: Job | None = None
        self.run = None  # the last finished run.Run
        self.original = None  # (run, models.load.Loaded): the unedited model of a run, loaded for the chat

    def finished(self, run) -> None:
        """`run` becomes the one the chat talks to."""
        with self.lock:
            self.run = run

    def start(self, fn: Callable[[Progress], Any]) -> Job:
        with self.lock:
            if self.job is not None and self.job.running:
                raise Busy("a run is in progress (perhaps started in another tab): wait for it or cancel it")
            self.job = Job(fn).start()
            return self.job


__all__ = ["Busy", "Cancelled", "Job", "Progress", "Workspace"]
