"""The charts as users see them, in headless Chromium (Playwright): ``dvc plots show``'s page, its vega
scripts served from the npm tarballs scripts/install_test_services.sh fetches, and the MLflow run page."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from pipeline_project import MlflowServer
from test_pipeline import EVALUATIONS

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VEGA_PACKAGES = Path(os.environ.get("VEGA_PACKAGES", Path.home() / ".cache" / "mnist-pipeline" / "vega"))
CDN_SCRIPT = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+)"></script>')
# Set before the page's scripts run: keeps the view each vegaEmbed call renders, by its element.
KEEP_VIEWS = """window.renderedViews = {}; let embed;
Object.defineProperty(window, "vegaEmbed", {configurable: true, get() { return embed; }, set(original) {
  embed = (element, ...rest) => original(element, ...rest).then((result) => {
    window.renderedViews[element] = result.view; return result; });
}});"""
# What a rendered chart holds: the rows its view drew from, and the size of its canvas.
RENDERED = """(element) => { const canvas = document.querySelector(element + " canvas");
  return {rows: window.renderedViews[element].data("source_0").map((row) => Object.assign({}, row)),
          width: canvas ? canvas.width : 0, height: canvas ? canvas.height : 0}; }"""


def series(rows: list[dict], y: str | None = None) -> dict[str, list[float]]:
    """A chart's y values by line ("file::column", or the column when one file gives all); ``y``: a single line's."""
    lines: dict[str, list[float]] = {}
    for row in rows:
        name = row.get("filename::field") or row.get("field") or y
        lines.setdefault(name, []).append(float(row["dvc_inferred_y_value"] if y is None else row[y]))
    return lines


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (bash scripts/install_test_services.sh installs Debian's chromium)")
    pytest.importorskip("playwright", reason="playwright is missing: uv sync installs the dev group")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


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


def test_dvc_plots_page_draws_every_series_without_a_comb_to_zero(reproduced_template, browser, tmp_path):
    reproduced_template.dvc("plots", "show", "-o", str(tmp_path / "dvc_plots"))
    page_file = tmp_path / "dvc_plots/index.html"
    libraries = vega_libraries(html := page_file.read_text())

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(KEEP_VIEWS)

    def serve(route) -> None:
        url = route.request.url
        if url.startswith("file:"):
            route.continue_()
        elif url in libraries:
            route.fulfill(body=libraries[url], content_type="application/javascript")
        else:
            route.abort()

    page.route("**/*", serve)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(page_file.as_uri())
    # Each chart's script hands vegaEmbed its element, then the chart replaces the script.
    charts = re.findall(r"vegaEmbed\('(#[^']+)'", html)
    page.wait_for_function("(n) => Object.keys(window.renderedViews).length >= n", arg=len(charts), timeout=180_000)
    assert sorted(page.evaluate("Object.keys(window.renderedViews)")) == sorted(charts) and errors == []

    rendered = {chart: page.evaluate(RENDERED, chart) for chart in charts}
    # Every chart drew on a canvas of its own.
    assert all(chart["width"] > 100 and chart["height"] > 100 for chart in rendered.values()), rendered.keys()
    # One chart per definition in dvc.yaml plus the confusion matrix, and no stray chart of a
    # history file's last column.
    assert len(rendered) == 6 and not any("history_csv" in chart for chart in rendered), rendered.keys()

    def chart(title: str) -> list[dict]:
        return next(found["rows"] for name, found in rendered.items() if name.startswith(f"#{title}"))

    accuracy = series(chart("Accuracy"))
    assert sorted(accuracy) == ["test_history.csv::test_accuracy", "train_history.csv::train_accuracy"]
    # The test accuracy has a point per evaluation and none at 0; the training accuracy one per step.
    tested, trained = accuracy["test_history.csv::test_accuracy"], accuracy["train_history.csv::train_accuracy"]
    assert len(tested) == len(EVALUATIONS) and min(tested) > 0 and len(trained) == 50
    for group in ("Weights", "Biases"):
        percentiles = series(chart(group))
        assert sorted(percentiles) == sorted(f"{group.lower()}_p{p}" for p in (0, 14, 29, 43, 57, 71, 86, 100))
        assert all(len(points) == len(EVALUATIONS) for points in percentiles.values()), group
        # The bands are ordered: every evaluation's minimum is at most its maximum.
        low, high = percentiles[f"{group.lower()}_p0"], percentiles[f"{group.lower()}_p100"]
        assert all(a <= b for a, b in zip(low, high)) and low != high, group
    test_loss = series(chart("Test_cross-entropy"), y="test_cross_entropy_sum")
    assert len(test_loss["test_cross_entropy_sum"]) == len(EVALUATIONS) and min(test_loss["test_cross_entropy_sum"]) > 0
    train_loss = series(chart("Training_cross-entropy"), y="train_cross_entropy_sum")
    assert len(train_loss["train_cross_entropy_sum"]) == 50
    # The static pictures are on the page too.
    for picture in ("accuracy", "mistakes", "weight_maps"):
        assert page.locator(f"img[src$='metrics_{picture}.png']").count() == 1, picture


@pytest.fixture
def mlflow_ui(reproduced_template, tmp_path):
    """``mlflow server`` on the project's store; yields its URL."""
    with MlflowServer(tmp_path, f"sqlite:///{reproduced_template.root / 'mlflow.db'}").running() as server:
        yield server.url


def test_mlflow_opens_the_experiment_on_its_runs_and_the_run_page_on_its_curves(
    reproduced_template, browser, mlflow_ui
):
    from mlflow import MlflowClient

    from pipeline.tracking import store

    client = MlflowClient(f"sqlite:///{reproduced_template.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-softmax")
    assert experiment.tags[store.EXPERIMENT_KIND_TAG] == store.EXPERIMENT_KIND
    (run,) = client.search_runs([experiment.experiment_id])

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The experiment's page, as the README links it, lists the training run.
    page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
    page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=120_000)
    assert "/runs" in page.url

    page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/model-metrics")
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
    page.get_by_text("final_test_accuracy", exact=True).first.wait_for(timeout=60_000)
    assert top("final_test_accuracy") > top("Model metrics", "last")
    assert errors == []
