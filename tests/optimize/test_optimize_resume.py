"""Kill-and-resume: SIGKILL `optimize` mid-study, run the same command again, and the study
continues in its SQLite file: finished trials are kept (not re-run), the finished count reaches
n_trials exactly, and the chosen trial is baked and saved with its number in the metadata."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest

from conftest import save_tiny

N_TRIALS = 10


def finished_rows(db) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT number, state FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def command(src, out) -> list[str]:
    return [sys.executable, "-m", "obliteratus.cli", "optimize", str(src), "--output", str(out),
            "--trials", str(N_TRIALS), "--startup-trials", "4", "--n-train", "8", "--n-val", "12", "--n-test", "4",
            "--max-new-tokens", "4", "--refusal-tokens", "24", "--set", "evaluate.perplexity=false"]


def test_sigkill_then_rerun_completes_the_study(tmp_path):
    src = save_tiny(tmp_path, "llama")
    out = tmp_path / "run"
    db = tmp_path / "run.study" / "study.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(src, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(finished_rows(db)) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first run ended (rc {proc.returncode}) before 3 trials: {proc.stderr.read()[-2000:]!r}")
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    before = dict(finished_rows(db))
    assert 3 <= len(before) < N_TRIALS, "killed too late to test resuming"
    assert not out.exists()

    done = subprocess.run(command(src, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    study = optuna.load_study(study_name="obliteratus-llama-optimized", storage=f"sqlite:///{db}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    numbers = [t.number for t in study.trials]
    assert len(finished) == N_TRIALS
    assert len(numbers) == len(set(numbers))
    assert set(before) <= {t.number for t in finished}  # the first run's trials were kept, not re-run
    leftovers = [t for t in study.trials if t.state.name not in ("COMPLETE", "PRUNED")]
    assert all(t.state.name == "FAIL" for t in leftovers) and len(leftovers) <= 1  # the trial SIGKILL cut short
    meta = json.loads((out / "obliteratus.json").read_text())
    assert meta["optimize"]["trial"] in {t.number for t in study.trials if t.state.name == "COMPLETE"}
    assert meta["optimize"]["trials"].get("COMPLETE", 0) + meta["optimize"]["trials"].get("PRUNED", 0) == N_TRIALS
