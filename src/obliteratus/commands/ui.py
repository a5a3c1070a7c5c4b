"""``obliteratus ui [MODEL]``: the local web app (ui/app.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from ..errors import ConfigError
from ..ui.app import launch


def ui(
    model: str = typer.Argument("demo", help="Model the Obliterate tab starts with (alias, directory, .gguf, hub id)."),
    output_root: Path = typer.Option(Path("obliteratus-runs"), "--output-root",
                                     help="Folder the app writes runs into and lists runs from."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to serve on."),
    auth: str = typer.Option(None, "--auth", help="Require a login, USER:PASSWORD."),
    share: bool = typer.Option(False, "--share/--no-share", help="Ask Gradio for a public share link (network)."),
) -> None:
    """Start the web app: obliterate, chat with both models, compare saved runs (needs the `ui` extra)."""
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("obliteratus ui needs Gradio: pip install 'obliteratus[ui]'")
    login = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth expects USER:PASSWORD")
        login = (user, password)
    launch(model, output_root, host, port, login, share)
