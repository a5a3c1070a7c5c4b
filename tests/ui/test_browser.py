"""The web app in a real browser: Playwright driving headless Chromium (Debian's chromium-headless-shell,
installed by .ci/run) against ``obliteratus ui`` served on a tiny random model. Skipped where Gradio,
Playwright or Chromium is missing.

Screenshots of each tab are written to $OBLITERATUS_UI_SHOTS (docs/img to refresh the docs' pictures)
or the test's temporary folder.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import chromium, save_tiny

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

# sizes for a tiny random model (tests/support/presets.py SMALL), given as the environment so the app's
# own settings (preset < environment < the form's options) use them
SMALL_ENV = {"OBLITERATUS_DATA__N_TRAIN": "24", "OBLITERATUS_DATA__N_VAL": "4", "OBLITERATUS_DATA__N_TEST": "4",
             "OBLITERATUS_EVALUATE__MAX_NEW_TOKENS": "3", "OBLITERATUS_EVALUATE__KL_TOKENS": "2",
             "OBLITERATUS_EVALUATE__PERPLEXITY": "false", "OBLITERATUS_LAYERS__KL_THRESHOLD": "1e9",
             "OBLITERATUS_LAYERS__INDUCE_THRESHOLD": "-1e9"}
RUN_S = 240_000  # ms: a tiny run takes seconds; the bound is for a loaded CI box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, output root, tiny model dir, the app) for the module's tests, served in this process."""
    if chromium() is None:
        pytest.skip("no Chromium installed (.ci/run installs chromium-headless-shell)")
    from obliteratus.ui.app import launch

    mp = pytest.MonkeyPatch()
    for key, value in SMALL_ENV.items():
        mp.setenv(key, value)
    base = tmp_path_factory.mktemp("ui")
    model = save_tiny(base / "tiny", "llama")
    root = base / "runs"
    port = free_port()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    app = launch(str(model), root, port=port, block=False)
    for s, handler in handlers.items():  # Gradio's handlers call sys.exit(0): not for the rest of the suite
        signal.signal(s, handler)
    yield f"http://127.0.0.1:{port}", root, model, app
    app.close()
    mp.undo()


@pytest.fixture(scope="module")
def browser(served):
    import shutil

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(chromium()), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served[0])
    yield page
    page.close()


def shots() -> Path:
    where = Path(os.environ.get("OBLITERATUS_UI_SHOTS") or "out/ui-shots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def number(page, elem_id: str):
    return page.locator(f"#{elem_id} input[type=number]").first


USER, BOT = "[data-testid=user]", "[data-testid=bot]"  # a Chatbot's messages


def answer(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} {BOT}").last.inner_text()


def start(page, model: str, name: str) -> None:
    field(page, "model").fill(model)
    field(page, "output-name").fill(name)
    page.locator("#start").click()


def test_a_bad_model_path_shows_the_clis_error(page, served, tmp_path):
    from obliteratus import obliterate
    from obliteratus.errors import ObliteratusError

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ObliteratusError) as err:
        obliterate(missing, "basic")
    start(page, missing, "bad")
    sync_api.expect(page.locator("#status")).to_contain_text(f"error: {err.value}", timeout=RUN_S)
    assert not (served[1] / "bad").exists()


def test_obliterate_then_chat_and_the_slider_changes_the_answer(page, served):
    url, root, model, app = served
    number(page, "layer").fill("2")  # as --layer 2
    start(page, str(model), "run-1")
    sync_api.expect(page.locator("#status")).to_contain_text("done:", timeout=RUN_S)
    from obliteratus import RunRecord

    selection = RunRecord.load(root / "run-1").selection
    assert (selection.layer, selection.method) == (2, "fixed")
    table = page.locator("#metrics")
    sync_api.expect(table).to_contain_text("refusal rate, harmful test")
    sync_api.expect(table).to_contain_text("KL first token")
    assert (root / "run-1" / "obliteratus.json").is_file()
    sync_api.expect(page.locator("#figures img").first).to_be_visible()  # the report's figures inline
    page.screenshot(path=str(shots() / "ui-obliterate.png"), full_page=True)

    page.get_by_role("tab", name="Chat").click()
    field(page, "prompt").fill("Tell me a story about a cat")
    number(page, "max-new-tokens").fill("8")
    number(page, "max-new-tokens").press("Enter")

    def ask(strength: str, new: bool = True) -> tuple[str, str]:
        """One turn (in a new conversation unless `new` is False): the two models' last answers."""
        if new:
            page.locator("#new-conversation").click()
            sync_api.expect(page.locator("#chat-status")).to_have_text("new conversation")
        number(page, "strength").fill(strength)
        number(page, "strength").press("Enter")
        page.locator("#ask").click()
        sync_api.expect(page.locator("#chat-status")).to_have_text(f"answered at strength {strength}", timeout=RUN_S)
        return answer(page, "original-chat"), answer(page, "edited-chat")

    original, edited = ask("1")
    assert original and edited
    at_zero = ask("0")
    assert at_zero[1] == at_zero[0] == original  # strength 0 is the original model
    at_two = ask("2")
    assert at_two[0] == original and at_two[1] != at_zero[1]  # the slider changes the edited answer only
    field(page, "prompt").fill("And a second one about a dog")
    ask("2", new=False)  # a second turn: both sides keep the conversation
    for side in ("original-chat", "edited-chat"):
        sync_api.expect(page.locator(f"#{side} {USER}")).to_have_count(2)
        sync_api.expect(page.locator(f"#{side} {BOT}")).to_have_count(2)
    page.screenshot(path=str(shots() / "ui-chat.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    page.locator("#refresh").click()
    sync_api.expect(page.locator("#runs-table")).to_contain_text("run-1")
    sync_api.expect(page.locator("#run-figures img").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(shots() / "ui-runs.png"), full_page=True)
    page.get_by_role("tab", name="Compare").click()
    sync_api.expect(page.locator("#compare-table")).to_contain_text("run-1", timeout=30_000)
    sync_api.expect(page.locator("#compare-figures img").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(shots() / "ui-compare.png"), full_page=True)


def test_cancel_leaves_no_output_and_a_second_tab_cannot_start_another_run(page, browser, served, monkeypatch):
    """A long run (the optimizer study, 500 trials) cancelled mid-way: no output directory. The second
    tab is loaded before the run starts, so its refusal does not race the run's end."""
    url, root, model, app = served
    monkeypatch.setenv("OBLITERATUS_OPTIMIZE__STUDY__N_TRIALS", "500")
    other = browser.new_page()
    other.goto(url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="optimized", exact=True).click()
    start(page, str(model), "run-cancel")
    sync_api.expect(page.locator("#status")).to_contain_text("STUDY", timeout=RUN_S)
    sync_api.expect(page.locator("#status progress")).to_have_attribute("max", "500")  # the trials' bar
    start(other, str(model), "run-other")
    sync_api.expect(other.locator("#status")).to_contain_text("error: a run is in progress", timeout=RUN_S)
    other.close()
    page.locator("#cancel").click()
    sync_api.expect(page.locator("#status")).to_contain_text("cancelled", timeout=RUN_S)
    assert not (root / "run-cancel").exists() and not (root / "run-other").exists()


def test_optimize_streams_the_study_then_bakes_the_picked_trial(page, served):
    """The Optimize tab: a 6-trial study, its Pareto plot and trials; then a 500-trial run of the same
    study, whose table grows while it runs, cancelled (its finished trials kept); a picked trial baked
    from what the study holds (no trial added) and its run saved. The study stays where the CLI keeps it."""
    from obliteratus import RunRecord
    from obliteratus.optimize.study import StudyReader
    from obliteratus.ui.app import study_place

    url, root, model, app = served
    _, where, storage = study_place(root, str(model), "optimized", "study-1", "")
    reader = StudyReader(storage, where["study"]["study_name"])
    page.get_by_role("tab", name="Optimize").click()
    field(page, "study-model").fill(str(model))
    field(page, "study-name").fill("study-1")
    status, grid = page.locator("#study-status"), page.locator("#trials-table [role=grid]")

    def rows() -> int:  # aria-rowcount: the rows and the header
        return int(grid.get_attribute("aria-rowcount") or 1) - 1

    def run(trials: int) -> None:
        number(page, "trials").fill(str(trials))
        page.locator("#study-start").click()
        sync_api.expect(status).to_contain_text("STUDY", timeout=RUN_S)

    page.locator("#bake").click()  # nothing to bake yet: the error says so, and nothing is made
    sync_api.expect(page.locator("#bake-status")).to_contain_text("has no completed trial yet: run the study first")
    assert not (root / "study-1.study").exists()
    run(6)
    sync_api.expect(status).to_contain_text("study done: 6 finished trials", timeout=RUN_S)
    complete = len(reader.read().trials)
    assert (root / "study-1.study" / "study.db").is_file() and complete > 0
    sync_api.expect(grid).to_have_attribute("aria-rowcount", str(complete + 1))
    sync_api.expect(page.locator("#pareto img")).to_be_visible()
    sync_api.expect(page.locator("#study-summary")).to_contain_text(f"{complete} complete")

    run(500)  # the same study, resumed: trials stream in until cancelled
    counts, deadline = [], time.monotonic() + RUN_S / 1000
    while not counts or counts[-1] < complete + 8:
        assert time.monotonic() < deadline and "error" not in status.inner_text()
        counts.append(rows())
        page.wait_for_timeout(100)
    page.locator("#study-cancel").click()
    sync_api.expect(status).to_contain_text("cancelled", timeout=RUN_S)
    sync_api.expect(status).to_contain_text("finished trials; Run study resumes it")
    assert len(set(counts)) >= 3, f"the table did not grow trial by trial: {counts}"
    finished = reader.read().finished
    assert 6 < finished < 500 and not (root / "study-1").exists()

    page.locator("#pick input").click()
    option = page.get_by_role("option").nth(2)  # after the default pick: the front's second trial or another
    picked = int(option.inner_text().split()[1])
    option.click()
    page.locator("#bake").click()
    sync_api.expect(page.locator("#bake-status")).to_contain_text(f"trial {picked} (index)", timeout=RUN_S)
    sync_api.expect(page.locator("#bake-metrics")).to_contain_text("refusal rate, harmful test")
    sync_api.expect(page.locator("#bake-figures img").first).to_be_visible()
    record = RunRecord.load(root / "study-1")
    trials = record.optimize.trials  # by state; the cancelled trial is a FAIL
    assert record.optimize.trial == picked and trials.get("COMPLETE", 0) + trials.get("PRUNED", 0) == finished
    page.screenshot(path=str(shots() / "ui-optimize.png"), full_page=True)
