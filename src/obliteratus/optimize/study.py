"""The Optuna study: storage, resume, scale-out, the Pareto front and the pick.

* Sampler: multivariate TPE, seeded, Heretic's n_startup_trials and n_ei_candidates
  (p-e-w/heretic ``src/heretic/main.py``); two objectives, both minimised: (refusal, KL).
* Storage: an Optuna RDB storage. Default ``sqlite:///<run_dir>/study.db``; re-running the same
  command loads the study (``load_if_exists``) and runs only the missing trials. An SQLite study
  has one worker, so trials left RUNNING in it belong to a killed process and are marked FAIL on
  start. ``postgresql://…`` (or any other RDB URL) is shared by several workers: each trial sends
  a heartbeat and Optuna fails the trials of dead workers after the grace period.
* The count: the study is done when n_trials trials are finished (COMPLETE or PRUNED), over all
  workers and runs. A worker stops asking once finished + running trials reach n_trials; if two
  workers ask at the same instant, a trial that finds n_trials live trials numbered before it
  fails at once with user attr ``surplus`` (never counted, never scored), so the finished count
  never exceeds n_trials and no trial is scored twice.
* The study's user attrs hold a fingerprint of what a trial means (model, layers, prompts, search
  space); a resumed or shared study with a different one is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rich.table import Table

from ..errors import ConfigError
from ..settings_file import redact_url
from .interrupts import gated
from .options import StudyOptions

FINISHED = ("COMPLETE", "PRUNED")


class Surplus(Exception):
    """A trial asked for after the study already had n_trials live trials (a race between workers)."""


def storage_url(storage: str | None, run_dir: str | os.PathLike, make: bool = True) -> str:
    """`storage` (optimize.study.storage) when set, else an SQLite file in `run_dir` (made if `make`)."""
    if storage:
        return storage
    run = Path(run_dir).expanduser().resolve()
    if make:
        run.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run / 'study.db'}"


def redact(url: str) -> str:
    """The URL without its password (for logs and saved metadata): settings_file.redact_url."""
    return redact_url(url)


def storage_error(what: str, url: str, err: Exception) -> ConfigError:
    """'<what> the study storage URL (password removed): the driver's first line'."""
    return ConfigError(f"{what} the study storage {redact(url)}: "
                       f"{str(getattr(err, 'orig', None) or err).splitlines()[0]}")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def worker_seed(seed: int, url: str) -> int:
    if is_sqlite(url):
        return seed
    return (seed + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())) % 2**32


def _storage(url: str, options: StudyOptions | None = None, attempts: int = 5):
    """Optuna's RDB storage (with `options`, a shared one's heartbeat). Workers that start together on
    an empty PostgreSQL database race to create its tables (CREATE TYPE / CREATE TABLE collide); the
    loser waits and loads them."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    storage = gated(optuna.storages.RDBStorage)  # Ctrl-C waits for a storage call to end (interrupts.py)
    shared = {} if options is None else {"heartbeat_interval": options.heartbeat_interval,
                                         "grace_period": options.grace_period}
    for attempt in range(attempts):
        try:
            if is_sqlite(url):
                return storage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            return storage(url, **shared)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


@contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """Hold an exclusive lock on an SQLite study for the life of the run (``<study.db>.lock``, an
    fcntl.flock): an SQLite study has one worker, which fails the RUNNING trials it finds on start,
    so a second process on the same file is refused instead of failing the first one's trial. Other
    RDB storages are shared by design (heartbeats) and are not locked."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database if is_sqlite(url) else None
    if not database or database == ":memory:":
        yield
        return
    lock = Path(database).expanduser().resolve().with_name(Path(database).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"study {study_name!r} in {redact(url)} is in use by {holder} (lock {lock}); an SQLite "
                              "study runs one process at a time: wait for it, or share a PostgreSQL study "
                              "(--storage postgresql://...) between workers") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


EXCESS = "refusal_excess"  # the user attr that carries a trial's refusal constraint (constrain_refusal)


def open_study(options: StudyOptions, url: str, study_name: str, fingerprint: dict):
    """Create or load the study; refuse one whose fingerprint differs."""
    import optuna
    from optuna.samplers import TPESampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url, options)
    legacy = {}  # Optuna < 5 has no Trial.set_constraint: the sampler reads the excess from a user attr
    if options.constrain and not hasattr(optuna.trial.Trial, "set_constraint"):
        legacy["constraints_func"] = lambda t: (t.user_attrs.get(EXCESS, 0.0),)
    sampler = TPESampler(n_startup_trials=options.n_startup_trials, n_ei_candidates=options.n_ei_candidates,
                         multivariate=True, seed=worker_seed(options.seed, url), **legacy)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=study_name,
                                directions=["minimize", "minimize"], load_if_exists=True)
    mine = json.loads(json.dumps(fingerprint, default=str))  # normalised as stored (tuples -> lists)
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", mine)
    elif stored != mine:
        diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise ConfigError(f"study {study_name!r} in {redact(url)} was made with different settings ({', '.join(diff)}); "
                          "give another --study-name or the same settings")
    return study


def seed(study, points: list[dict]) -> None:
    """Enqueue `points` (full parameter dicts) as the first trials of a new study; a study that
    already has trials (resumed, or another worker's) is left alone, and Optuna skips a point that
    some trial already has, so racing workers enqueue each point at most about once."""
    if not points or study.get_trials(deepcopy=False):
        return
    for params in points:
        study.enqueue_trial(params, skip_if_exists=True)


def constrain_refusal(trial, excess: float) -> None:
    """Record the trial's refusal rate (or, when pruned, its lower bound) minus the target as an
    Optuna constraint: > 0 is infeasible, and the TPE sampler ranks infeasible trials by it."""
    trial.set_user_attr(EXCESS, excess)
    if hasattr(trial, "set_constraint"):  # Optuna >= 5
        trial.set_constraint("refusal", excess)


CONFIRM_REFUSAL, CONFIRMED = "confirm_refusal", "confirmed"  # user attrs of an in-study confirmation


def constrain_confirmation(trial, excess: float) -> None:
    """Record a confirmation's refusal rate minus its bar as a second Optuna constraint ("confirm");
    > 0 makes the trial infeasible (an Optuna constraint cannot be overwritten, hence its own key). The
    legacy user attr keeps the larger excess."""
    trial.set_user_attr(EXCESS, max(float(trial.user_attrs.get(EXCESS, excess)), excess))
    if hasattr(trial, "set_constraint"):  # Optuna >= 5
        trial.set_constraint("confirm", excess)


def finished_count(study) -> int:
    """The study's finished (complete or pruned) trials: what n_trials counts."""
    return _count(study, FINISHED)


def _count(study, states: tuple[str, ...], below: int | None = None) -> int:
    trials = study.get_trials(deepcopy=False)
    return sum(t.state.name in states and (below is None or t.number < below) for t in trials)


def run_study(study, n_trials: int, objective: Callable, url: str) -> None:
    """Run trials until n_trials are finished (or the others' running trials will finish them)."""
    from optuna.trial import TrialState

    if is_sqlite(url):  # one worker: RUNNING trials are those of a killed process
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
    live = FINISHED + ("RUNNING",)

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def guarded(trial):
        trial.set_user_attr("worker", worker)
        if _count(study, live, below=trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise Surplus(f"trial {trial.number}: the study already has {n_trials} trials")
        return objective(trial)

    def enough(study_, frozen) -> None:
        if _count(study_, live) >= n_trials:
            study_.stop()

    if _count(study, live) >= n_trials:
        return
    study.optimize(guarded, n_trials=n_trials - _count(study, live), callbacks=[enough], catch=(Surplus,),
                   gc_after_trial=False)


@dataclass(frozen=True)
class FrontRow:
    number: int
    refusal: float
    kl: float
    params: dict


def completed(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def rows_of(trials) -> list[FrontRow]:
    return [FrontRow(t.number, t.values[0], t.values[1], dict(t.params)) for t in trials]


def front_of(rows: list[FrontRow]) -> list[FrontRow]:
    """The rows no other row beats on both objectives (refusal, KL), by refusal then KL."""
    front, best_kl = [], float("inf")
    for r in sorted(rows, key=lambda r: (r.refusal, r.kl, r.number)):
        if r.kl < best_kl:
            front.append(r)
            best_kl = r.kl
    return front


def pareto_front(study) -> list[FrontRow]:
    """Completed trials no other completed trial beats on both objectives, by refusal then KL."""
    return front_of(rows_of(completed(study)))


@dataclass(frozen=True)
class StudyState:
    """What a study holds at one moment: its completed trials by number, and a count per trial state."""

    trials: list[FrontRow]
    states: dict[str, int]

    @property
    def front(self) -> list[FrontRow]:
        return front_of(self.trials)

    @property
    def finished(self) -> int:
        return sum(self.states.get(s, 0) for s in FINISHED)


class StudyReader:
    """Reads a study while a run (this process or another worker) adds trials to it: the web app's
    live view. A study or SQLite file that does not exist yet reads as empty (and is not created); a
    database server that cannot be reached is a ConfigError."""

    def __init__(self, url: str, study_name: str):
        import optuna  # noqa: F401  imported here, not in the polling thread beside a run that imports them too
        import sqlalchemy.engine  # noqa: F401
        import sqlalchemy.exc  # noqa: F401

        self.url, self.study_name, self._study = url, study_name, None

    def read(self) -> StudyState:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            study = self._study or self._open()
        except SQLAlchemyError as err:
            if not is_sqlite(self.url):
                raise storage_error("cannot read", self.url, err) from None
            study = None  # the run is creating the SQLite file's tables this instant: read it next time
        if study is None:
            return StudyState([], {})
        trials = study.get_trials(deepcopy=False)
        states: dict[str, int] = {}
        for t in trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        return StudyState(rows_of(t for t in trials if t.state.name == "COMPLETE"), states)

    def _open(self):
        import optuna
        from sqlalchemy.engine import make_url

        if is_sqlite(self.url):
            database = make_url(self.url).database
            if not database or not Path(database).expanduser().is_file():
                return None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self._study = optuna.load_study(study_name=self.study_name, storage=_storage(self.url))
        except KeyError:  # no study of that name yet
            return None
        return self._study


def front_table(front: list[FrontRow], chosen: int | None = None, n_harmful: int | None = None):
    table = Table(title="Pareto front (validation split)")
    for name in ("trial", "refusal", "KL first token", "scope", "index", "attn peak@pos", "mlp peak@pos"):
        table.add_column(name, justify="right")
    for r in front:
        p = r.params
        refusal = f"{r.refusal:.3f}" + (f" ({round(r.refusal * n_harmful)}/{n_harmful})" if n_harmful else "")
        cells = [f"{'→ ' if r.number == chosen else ''}{r.number}", refusal, f"{r.kl:.4f}", str(p["direction_scope"]),
                 "—" if p["direction_scope"] == "per_layer" else f"{p['direction_index']:.2f}"]
        for c in ("attn", "mlp"):
            cells.append(f"{max(0.0, p[f'{c}.max_weight']):.2f}@{p[f'{c}.max_weight_position']:.1f}")
        table.add_row(*cells)
    return table


def pick(study, index: int | None = None, target_refusal: float = 0.05):
    """The trial to bake: trial number `index` when given (any completed trial); else the lowest-KL
    completed trial with refusal <= target_refusal; else the lowest-refusal one (ties: lower KL)."""
    trials = completed(study)
    if not trials:
        raise ConfigError("the study has no completed trial to pick from")
    if index is not None:
        for t in trials:
            if t.number == index:
                return t
        raise ConfigError(f"--pick {index}: no completed trial has that number; completed: "
                          f"{', '.join(str(t.number) for t in trials)}")
    within = candidates(trials, target_refusal)
    if within:
        return within[0]
    return min(trials, key=lambda t: (t.values[0], t.values[1], t.number))


def candidates(trials: list, target_refusal: float) -> list:
    """The trials whose val refusal is within `target_refusal`, lowest KL first (ties: lower
    refusal, then lower number): the order in which the default pick considers them."""
    return sorted((t for t in trials if t.values[0] <= target_refusal),
                  key=lambda t: (t.values[1], t.values[0], t.number))


def pick_confirmed(study, confirm: Callable[[object, float], float], target_refusal: float = 0.05,
                   max_checks: int = 8, confirm_target: float | None = None,
                   strengths: Sequence[float] = (1.0,), recount: Callable[[object, float], float] | None = None,
                   max_recounts: int = 4) -> tuple[object, float, list[dict]]:
    """The default pick, confirmed on more prompts: the lowest-KL completed trial whose refusal is
    within `target_refusal` on the validation prompts and within `confirm_target` (default: the same
    target) on the confirmation prompts. Candidates (val refusal within the target) are taken lowest
    KL first, and each is tried at every strength multiplier of `strengths` in turn (λ times every
    writer's kernel weight, lowest first) before the next candidate, at most `max_checks`
    confirmations in all (a verdict stored during the study, user attr ``confirm_refusal`` at strength
    1, is used as it is and not counted: ``confirm_during``); ``confirm(trial, strength)`` gives the
    refusal rate on the confirmation prompts (a lower bound above `confirm_target` when it stopped early). If none of those checked
    passes, the checked (trial, strength) with the fewest confirmation refusals (ties: lower strength,
    lower KL). A failed check that stopped early only gives a lower bound, so with `recount` (the
    exact rate, nothing stopped early) the failed checks are re-counted lowest bound first until no
    remaining bound can beat the best exact rate (a bound only understates), at most `max_recounts`
    of them; a re-counted row gets ``"bound"`` (what the check had) and ``"exact": True``. The pick
    is then the exact argmin, or, when the re-count budget ran out first (or without `recount`), the
    fewest over the exact rates and the remaining bounds. Without candidates, :func:`pick`'s fallback
    (lowest val refusal) at strength 1. Returns (trial, strength, checks), one {"number", "strength",
    "val_refusal", "kl", "confirm_refusal", "passed"} row per check."""
    bar = target_refusal if confirm_target is None else confirm_target
    within = candidates(completed(study), target_refusal)
    if not within:
        return pick(study, None, target_refusal), 1.0, []
    checks: list[dict] = []
    tried: list[tuple[object, float]] = []
    fresh = 0
    for t in within:
        for strength in strengths:
            stored = t.user_attrs.get(CONFIRM_REFUSAL) if strength == 1.0 else None
            if stored is None and fresh >= max_checks:
                break
            rate = float(confirm(t, strength) if stored is None else stored)
            fresh += stored is None
            checks.append({"number": t.number, "strength": strength, "val_refusal": t.values[0], "kl": t.values[1],
                           "confirm_refusal": rate, "passed": rate <= bar}
                          | ({} if stored is None else {"during_study": True}))
            tried.append((t, strength))
            if rate <= bar:
                return t, strength, checks
    def rank(i: int) -> tuple:
        return checks[i]["confirm_refusal"], checks[i]["strength"], checks[i]["kl"], i

    if recount is not None:
        best = None
        for i in sorted(range(len(checks)), key=rank):  # lowest bound first
            if max_recounts <= 0 or (best is not None and rank(i) >= rank(best)):
                break  # from here on every exact rate is at least its bound: none can beat `best`
            bound = checks[i]["confirm_refusal"]
            checks[i] |= {"confirm_refusal": float(recount(*tried[i])), "bound": bound, "exact": True}
            max_recounts -= 1
            if best is None or rank(i) < rank(best):
                best = i
    best = min(range(len(checks)), key=rank)  # exact rates where re-counted, else the bounds
    return tried[best][0], tried[best][1], checks
