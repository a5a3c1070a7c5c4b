"""report.html: one embedded PNG per figure, valid PNG files, no URL anywhere, graceful skips."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from obliteratus.errors import ObliteratusError
from obliteratus.report import build_report

from conftest import chromium_dom, save_tiny

IMG = re.compile(r'<img alt="([a-z_]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
OVERRIDES = {"data": {"n_train": 8, "n_val": 4, "n_test": 6}, "evaluate": {"max_new_tokens": 8, "ppl_window": 64},
             "layers": {"induce_threshold": None}}  # arditi selection: a random model induces nothing


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from obliteratus.pipeline import obliterate

    tmp = tmp_path_factory.mktemp("report")
    obliterate(str(save_tiny(tmp, "llama")), output=str(tmp / "run"), overrides=OVERRIDES)
    return tmp / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("report.html", "plots"))
    return out


def _images(html: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in IMG.findall(html)}


def _valid_png(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()
    return Image.open(io.BytesIO(data)).size


def test_report_embeds_every_plot_as_a_valid_png_and_has_no_url(run_dir):
    path = build_report(run_dir)
    html = path.read_text()
    assert path == run_dir / "report.html"
    images = _images(html)
    assert set(images) == {"layer_norms", "selection", "cosine", "refusal", "kl_per_position", "pca"}
    assert html.count("<img") == len(images)  # every image is a data URI
    for name, data in images.items():
        assert (run_dir / "plots" / f"{name}.png").read_bytes() == data
        w, h = _valid_png(data)
        assert w > 100 and h > 100
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert "skipped" not in html and "from pca.json" in html
    pca = json.loads((run_dir / "pca.json").read_text())  # the run's own panels: train prompts at PROBE
    assert [row["layer"] for row in pca["layers"]] == [1, 2, 3]  # quarter..all of 3 layers (the source, 2, among them)
    assert all(len(row["harmful"]) == 8 and len(row["harmless"]) == 8 for row in pca["layers"])
    meta = json.loads((run_dir / "obliteratus.json").read_text())
    assert f"{meta['metrics_after']['kl_mean']:.4g}" in html  # the metrics table shows the run's numbers
    from obliteratus.report import figures
    from obliteratus.report.html import panels

    # the web app's figures: every panel's PNG, in the page's order
    assert [p.stem for p, _ in figures(run_dir)] == [stem for stem, *_ in panels(meta, run_dir)]


def test_pareto_plot_with_every_trial():
    from obliteratus.report import plots

    rows = [{"number": i, "refusal": r, "kl": k} for i, (r, k) in enumerate([(0.5, 0.01), (0.0, 0.3), (0.5, 0.2)])]
    assert _valid_png(plots.pareto_front(rows[:2], 1, 0.05, trials=rows))[0] > 100


def test_pca_panel_from_analysis_json_and_cosine_skipped_without_mean_diffs(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from obliteratus.analysis.pca import pca_layers

    run = _copy(run_dir, tmp_path)
    tensors = load_file(str(run / "directions.safetensors"))
    assert tensors["mean_diffs"].shape[0] == 4  # [L+1, d]
    save_file({k: v for k, v in tensors.items() if k != "mean_diffs"}, str(run / "directions.safetensors"))
    (run / "pca.json").unlink()
    html = build_report(run).read_text()
    assert "pca" not in _images(html) and "no pca.json or analysis.json" in html
    assert "cosine" not in _images(html) and "layer_norms" in _images(html)  # the norms come from the metadata
    assert "cosine panel skipped" in html and "mean_diffs" in html
    gen = torch.Generator().manual_seed(0)
    acts = lambda: torch.randn(5, 4, 8, generator=gen)  # noqa: E731  [n, L+1, d]
    # what `obliteratus analyze` writes: a list of rows, one per layer
    (run / "analysis.json").write_text(json.dumps({"pca": pca_layers(acts(), acts(), [1, 3])}))
    html = build_report(run).read_text()
    images = _images(html)
    assert "pca" in images and "cosine" not in images and "from analysis.json" in html
    _valid_png(images["pca"])
    (run / "analysis.json").write_text(json.dumps({"pca": {"2": {"harmful": [[0, 1]], "harmless": [[1, 0]]}}}))
    assert "pca" in _images(build_report(run).read_text())  # a {layer: {...}} table is read too


def test_norms_panel_from_the_saved_mean_diffs_when_the_metadata_has_none(run_dir, tmp_path):
    from safetensors.torch import load_file

    run = _copy(run_dir, tmp_path)
    meta = json.loads((run / "obliteratus.json").read_text())
    saved = meta["directions"].pop("layer_norms")
    (run / "obliteratus.json").write_text(json.dumps(meta))
    diffs = load_file(str(run / "directions.safetensors"))["mean_diffs"]
    assert torch.allclose(diffs.double().norm(dim=-1), torch.tensor(saved[-1] if isinstance(saved[0], list) else saved,
                                                                    dtype=torch.float64), atol=1e-4)
    assert "layer_norms" in _images(build_report(run).read_text())


def test_urls_in_metadata_are_not_links_and_the_command_rebuilds(run_dir, tmp_path, capsys, monkeypatch):
    from obliteratus.commands.report import report

    monkeypatch.setenv("COLUMNS", "20")  # narrower than the path: it is printed whole, not wrapped

    run = _copy(run_dir, tmp_path)
    meta = json.loads((run / "obliteratus.json").read_text())
    meta["settings"]["source"] = "https://github.com/example/repo <b>x</b>"
    (run / "obliteratus.json").write_text(json.dumps(meta))
    report(run)
    html = (run / "report.html").read_text()
    assert f"report: {run / 'report.html'}\n" == capsys.readouterr().out
    assert "https://" not in html and "<b>x</b>" not in html and "github.com/example/repo" in html


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ObliteratusError, match="obliteratus.json"):
        build_report(tmp_path)


def test_without_matplotlib_the_page_still_builds_with_notes(run_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    run = _copy(run_dir, tmp_path)
    html = build_report(run).read_text()
    assert "<img" not in html and html.count("matplotlib is not installed") == 6
    assert not (run / "plots").exists()


def test_report_opens_in_headless_chromium(run_dir):
    dom = chromium_dom(run_dir / "report.html")
    assert dom.count("<img") == 6 and "</html>" in dom
