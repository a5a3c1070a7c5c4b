"""Ctrl-C is held while a study's storage call runs and delivered when it returns (optimize/interrupts.py)."""

from __future__ import annotations

import os
import signal

import pytest

from obliteratus.optimize.interrupts import GATE, InterruptGate, gated


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler for each test (an app served in this process, e.g. Gradio's in
    tests/ui, installs its own)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_inside_a_closed_block_waits_for_its_end():
    gate = InterruptGate()
    reached = []
    with gate.installed():
        with pytest.raises(KeyboardInterrupt):
            with gate.closed():
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the block: held
                reached.append("after the signal")
        assert reached == ["after the signal"]
        with pytest.raises(KeyboardInterrupt):  # outside a closed block: at once
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("never")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_the_previous_sigterm_handler_gets_the_held_signal():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        gate = InterruptGate()
        with gate.installed(), gate.closed():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_gated_storage_holds_the_signal_for_the_whole_call(tmp_path):
    """Optuna's RDB storage, gated: a SIGINT sent during a write is raised after it, and the trial
    attribute it wrote is committed (no connection is left holding the lock)."""
    optuna = pytest.importorskip("optuna")
    storage = gated(optuna.storages.RDBStorage)(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    write = optuna.storages.RDBStorage.set_trial_user_attr  # under the gate's wrapper

    def interrupted_write(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the call
        return write(self, *args, **kwargs)

    type(storage).set_trial_user_attr = interrupted_write
    try:
        with GATE.installed(), pytest.raises(KeyboardInterrupt):
            trial.set_user_attr("k", 1)
    finally:
        del type(storage).set_trial_user_attr
    again = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert again.trials[0].user_attrs == {"k": 1}
    again.tell(trial.number, 1.0)  # the database is not locked
