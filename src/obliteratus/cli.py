"""Command line: a thin shell over the Python API. It only gathers overrides; defaults live in
:mod:`obliteratus.settings` and the presets. Every verb is a module of :mod:`obliteratus.commands`;
this module holds the typer app that registers them and :func:`main` (error lines, exit codes,
signals), the console script's entry point."""

from __future__ import annotations

import signal
import sys

import typer
from transformers.utils import logging as hf_logging

from .commands.analyze import analyze
from .commands.bake import bake
from .commands.chat import chat, compare
from .commands.common import fail
from .commands.config import config
from .commands.evaluate import evaluate
from .commands.judge import judge
from .commands.models import models
from .commands.obliterate import obliterate
from .commands.optimize import optimize
from .commands.presets import presets
from .commands.probe import probe
from .commands.report import report
from .commands.study import study
from .commands.ui import ui
from .errors import ObliteratusError

try:
    from typer._click import exceptions as click  # typer >= 0.24 bundles its own click
except ImportError:  # pragma: no cover
    from click import exceptions as click

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Find, study and remove refusal directions in transformer language models.")

VERBS = (obliterate, evaluate, probe, models, presets, config, analyze, optimize, judge, study, report, chat, compare,
         bake, ui)
for _verb in VERBS:  # in this order in --help
    app.command()(_verb)


def main() -> None:
    """Every failure the user can fix ends in one ``error: ...`` line on stderr: our own errors (exit 2),
    typer's usage errors such as an option out of its range (exit 2) and Ctrl-C (exit 130)."""
    _quiet_transformers()
    previous = signal.signal(signal.SIGTERM, _terminated)  # `kill PID` cleans up like Ctrl-C
    try:
        code = app(standalone_mode=False)  # click's errors come back as exceptions, not a styled panel
    except ObliteratusError as err:
        fail(str(err), err.exit_code)
    except click.NoArgsIsHelpError:
        sys.exit(2)  # typer has printed the help
    except click.UsageError as err:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        fail(f"{err.format_message()}{where}", err.exit_code)
    except click.ClickException as err:
        fail(err.format_message(), err.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130 and not isinstance(code, bool):  # typer's exit code for a KeyboardInterrupt (Ctrl-C, SIGTERM)
        fail("interrupted", 130)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


def _quiet_transformers() -> None:
    """Our own bars are enough: no transformers/hub progress bars."""
    hf_logging.disable_progress_bar()


def _terminated(signum, frame) -> None:
    """SIGTERM is handled as SIGINT: the KeyboardInterrupt unwinds the stack, so a half-written output
    (save.write_atomically) is removed before the process exits."""
    raise KeyboardInterrupt(f"terminated by signal {signum}")


if __name__ == "__main__":
    main()
