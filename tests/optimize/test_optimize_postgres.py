"""Scale-out: two `optimize --worker` processes share one study in a real PostgreSQL and together
finish exactly n_trials trials, none lost (nothing left running) and none duplicated.

Needs a server: set OBLITERATUS_TEST_POSTGRES to its URL (``.ci/postgres.sh`` starts one on
loopback and prints it); skipped otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import optuna
import pytest

from conftest import save_tiny

URL = os.environ.get("OBLITERATUS_TEST_POSTGRES")
N_TRIALS = 12

pytestmark = pytest.mark.skipif(not URL, reason="set OBLITERATUS_TEST_POSTGRES to a PostgreSQL URL "
                                                "(.ci/postgres.sh starts one on 127.0.0.1)")


def test_two_workers_share_one_study(tmp_path):
    src = save_tiny(tmp_path, "llama")
    name = f"test-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "obliteratus.cli", "optimize", str(src), "--worker", "--storage", URL,
           "--study-name", name, "--trials", str(N_TRIALS), "--startup-trials", "4", "--n-train", "8",
           "--n-val", "12", "--n-test", "4", "--refusal-tokens", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=name, storage=URL)
    try:
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == N_TRIALS
        numbers = [t.number for t in trials]
        assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
        others = [t for t in trials if t not in finished]
        assert all(t.state.name == "FAIL" and t.user_attrs.get("surplus") for t in others)  # only lost races
        assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers ran trials
    finally:
        optuna.delete_study(study_name=name, storage=URL)
