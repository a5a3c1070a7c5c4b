"""The CLI in process (tests/commands/test_cli.py, tests/test_settings_file.py, tests/test_trust_files.py,
tests/models/test_trust_models.py): run a command line, check it ended in one error line, hash a folder."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from obliteratus.cli import main

FAST = ["--n-train", "8", "--n-val", "4", "--n-test", "6", "--max-new-tokens", "8", "--set", "evaluate.ppl_window=64"]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["obliteratus", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def assert_one_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in err[err.index("error:"):].lower(), err
