"""The charts as users see them, in headless Chromium (Playwright): ``dvc plots show``'s page, its vega
scripts served from the npm tarballs scripts/install_test_services.sh fetches, and the MLflow run page."""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_project import MlflowServer
from test_pipeline import EVALUATIONS

pytestmark = pytest.mark.slow

VEGA_PACKAGES = Path(os.environ.get("VEGA_PACKAGES", Path.home() / ".cache" / "mnist-pipeline" / "vega"))
CDN_SCRIPT = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+)"></script>')
# Set before the page's scripts run: keeps the view each vegaEmbed call renders, by its element.
KEEP_VIEWS = """window.renderedViews = {}; let embed;
Object.defineProperty(window, "vegaEmbed", {configurable: true, get() { return embed; }, set(original) {
  embed = (element, ...rest) => original(element, ...rest).then((result) => {
    window.renderedViews[element] = result.view; return result; });
}});"""
# What a rendered chart drew: each mark of its scenegraph, its role (axis-title, legend-label...) and items.
MARKS = """(element) => { const marks = []; const walk = (mark) => {
  marks.push({role: mark.role, type: mark.marktype, items: mark.items.map((item) => ({text: item.text,
    angle: item.angle, stroke: item.stroke, line: item.datum && item.datum.line,
    count: item.datum && item.datum.xy_count}))});
  mark.items.forEach((item) => (item.items || []).forEach(walk)); };
  walk(window.renderedViews[element].scenegraph().root); return marks; }"""
PAGE_LIMIT = 2_500_000  # bytes: the page with its pictures, for a run of the seed's 10,000 steps


def items(marks: list[dict], role: str, kind: str | None = None) -> list[dict]:
    return [item for mark in marks if mark["role"] == role and kind in (None, mark["type"]) for item in mark["items"]]


def texts(marks: list[dict], role: str) -> list[str]:
    return [str(item["text"]) for item in items(marks, role)]


def axis_titles(marks: list[dict]) -> dict[str, str]:
    return {"y" if item["angle"] else "x": str(item["text"]) for item in items(marks, "axis-title")}


def lines(marks: list[dict]) -> list[tuple[str, str, int]]:
    """Each line a chart drew, in drawing order (the last on top): its name, colour and number of points."""
    drawn = [mark["items"] for mark in marks if mark["type"] == "line" and mark["items"]]
    return [(items[0]["line"], items[0]["stroke"], len(items)) for items in drawn]


def vega_libraries(page_html: str) -> dict[str, bytes]:
    """The scripts the page loads from the CDN, keyed by their URL, read from the npm tarballs."""
    libraries = {}
    for name, version in CDN_SCRIPT.findall(page_html):
        tarball = VEGA_PACKAGES / f"{name}-{version}.tgz"
        if not tarball.is_file():
            pytest.skip(f"{tarball} is missing: bash scripts/install_test_services.sh fetches it from npm")
        with tarfile.open(tarball) as archive:
            script = archive.extractfile(f"package/build/{name}.min.js")
            assert script is not None
            libraries[f"https://cdn.jsdelivr.net/npm/{name}@{version}"] = script.read()
    assert len(libraries) == 3, "DVC's page no longer loads vega, vega-lite and vega-embed"
    return libraries


def test_dvc_plots_page_reads_at_a_glance(reproduced_template, browser, tmp_path):
    project = reproduced_template.copy_to(tmp_path / "copy")
    # As long a history as the seed's: the charts draw report's means of it, not its 10,000 points.
    steps = np.arange(1, 10_001)
    noisy = np.random.default_rng(0).uniform(0.8, 1.0, len(steps))
    history = pd.DataFrame({"step": steps, "train_accuracy": noisy, "train_cross_entropy_sum": 30 * noisy})
    history.to_csv(project.root / "metrics/train_history.csv", index=False)
    project.dvc("repro", "--single-item", "report")
    project.dvc("plots", "show", "-o", str(tmp_path / "dvc_plots"))
    page_file = tmp_path / "dvc_plots/index.html"
    libraries = vega_libraries(html := page_file.read_text())
    size = sum(path.stat().st_size for path in page_file.parent.rglob("*") if path.is_file())
    assert size <= PAGE_LIMIT, f"the page and its pictures take {size:,} bytes"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(KEEP_VIEWS)

    def serve(route) -> None:
        url = route.request.url
        if url.startswith("file:"):
            route.continue_()
        elif url in libraries:
            route.fulfill(body=libraries[url], content_type="application/javascript; charset=utf-8")
        else:
            route.abort()

    page.route("**/*", serve)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(page_file.as_uri())
    # Each chart's script hands vegaEmbed its element, then the chart replaces the script.
    charts = re.findall(r"vegaEmbed\('(#[^']+)'", html)
    page.wait_for_function("(n) => Object.keys(window.renderedViews).length >= n", arg=len(charts), timeout=180_000)
    assert sorted(page.evaluate("Object.keys(window.renderedViews)")) == sorted(charts) and errors == []
    page.screenshot(path=tmp_path / "dvc_plots.png", full_page=True)

    drawn = {chart: page.evaluate(MARKS, chart) for chart in charts}
    titles = {texts(marks, "title-text")[-1]: marks for marks in drawn.values()}
    # Each chart once: one per definition in dvc.yaml, the confusion matrix, and the pictures no chart shows.
    expected = ["Accuracy", "Training cross-entropy", "Test cross-entropy", "Weights", "Biases"]
    assert sorted(titles) == sorted([*expected, "Confusion matrix (test images)"]) and len(drawn) == len(titles)
    # accuracy.png (the README's) is no plot: the Accuracy chart draws its curves.
    for picture, count in (("accuracy", 0), ("mistakes", 1), ("weight_maps", 1)):
        assert page.locator(f"img[src$='metrics_{picture}.png']").count() == count, picture
    # Every axis has a title of its own, none DVC's placeholder "y".
    for title, marks in titles.items():
        axes = axis_titles(marks)
        assert len(axes["y"]) > 5 and axes["x"] in ("training step", "predicted digit"), (title, axes)

    # The training curve is report's 100 means, in a colour of its own, and the test set's line is drawn over it.
    (train, train_colour, train_points), (test, test_colour, test_points) = lines(titles["Accuracy"])
    assert (train, test) == ("training_curve.csv::train_accuracy", "test_history.csv::test_accuracy")
    assert train_points == 100 and test_points == len(EVALUATIONS) and train_colour != test_colour
    percentiles = lines(titles["Weights"])
    assert [name for name, _, _ in percentiles] == [f"weights_p{p}" for p in (0, 14, 29, 43, 57, 71, 86, 100)]
    assert len({colour for _, colour, _ in percentiles}) == 8
    assert texts(titles["Biases"], "legend-label")[:2] == ["biases_p0", "biases_p14"]

    # The confusion matrix shows its counts, a row per actual digit as in the PNGs: they add up to the test set.
    confusion = titles["Confusion matrix (test images)"]
    assert axis_titles(confusion) == {"x": "predicted digit", "y": "actual digit"}
    counts = items(confusion, "mark", "text")
    rows = pd.read_csv(project.root / "metrics/confusion.csv")
    assert len(counts) == rows["actual"].nunique() * rows["predicted"].nunique() > 10
    assert all(item["text"] == str(item["count"]) for item in counts)
    assert sum(item["count"] for item in counts) == len(rows)


def test_mlflow_run_page_draws_the_history_curves_above_the_final_figures(reproduced_template, browser, tmp_path):
    """The run's page (the experiment's page, as the README links it, listing the runs: test_tracking.py)."""
    from mlflow import MlflowClient

    from pipeline.tracking import store

    uri = f"sqlite:///{reproduced_template.root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mnist-softmax")
    assert experiment.tags[store.EXPERIMENT_KIND_TAG] == store.EXPERIMENT_KIND
    (run,) = client.search_runs([experiment.experiment_id])

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with MlflowServer(tmp_path, uri).running() as server:
        page.goto(f"{server.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/model-metrics")
        # The per-step curves form the first section of charts ("history"), above the section of the
        # one-point final figures ("Model metrics", also the name of the tab above both). MLflow draws
        # only the charts on screen, so each comparison is made at one scroll position.
        curves = ("train_accuracy", "train_cross_entropy_sum", "test_accuracy", "test_cross_entropy_sum")
        for title in curves:
            page.get_by_text(title, exact=True).first.wait_for(timeout=120_000)

        def top(text: str, which: str = "first") -> float:
            box = getattr(page.get_by_text(text, exact=True), which).bounding_box()
            assert box is not None, text
            return box["y"]

        history, final_figures = top("history"), top("Model metrics", "last")
        assert history < final_figures
        for title in curves:
            assert history < top(title) < final_figures, title
        # The curves were drawn against the step, one line each (MLflow draws its charts with Plotly).
        page.get_by_text("Step", exact=True).first.wait_for(timeout=60_000)
        assert page.locator("svg .scatterlayer .trace").count() >= len(curves)
        # Below them, the final figures.
        page.get_by_text("Model metrics", exact=True).last.scroll_into_view_if_needed()
        page.get_by_text("macro_f1", exact=True).first.wait_for(timeout=60_000)
        assert top("macro_f1") > top("Model metrics", "last")
        assert errors == []
