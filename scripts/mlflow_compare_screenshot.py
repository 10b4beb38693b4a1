"""Screenshot MLflow's run-comparison page for the README (docs/mlflow-compare.png).

With an MLflow server holding the sweep's runs (``mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db``)::

    uv run python scripts/mlflow_compare_screenshot.py --tracking-uri http://127.0.0.1:5000

It compares every finished run of the experiment, lowest learning rate first, as a person would: in
Debian's headless Chromium driven by Playwright (as tests/test_browser.py does), it opens
``#/compare-runs``, closes the assistant side panel and puts ``--metric`` on the
parallel-coordinates plot instead of the metric MLflow happens to pick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def arguments(out: str, size: str) -> argparse.Namespace:
    """The options both screenshot scripts take."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    parser.add_argument("--tracking-uri", default=uri, help="a running MLflow server (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="mnist-softmax")
    parser.add_argument("--metric", default="test_accuracy", help="the compare plot's metric ('': MLflow's)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--size", default=size, help="the page's size, WIDTHxHEIGHT")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    return parser.parse_args()


def experiment_id(client, args: argparse.Namespace) -> str:
    found = client.get_experiment_by_name(args.experiment)
    if found is None:
        sys.exit(f"error: {args.tracking_uri} has no experiment {args.experiment!r}")
    return found.experiment_id


@contextlib.contextmanager
def page_of(args: argparse.Namespace):
    """A page of headless Chromium of exactly ``--size``; waits end after four minutes (a busy machine)."""
    from playwright.sync_api import sync_playwright

    width, height = (int(value) for value in args.size.lower().split("x"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(240_000)
            yield page
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            print(f"wrote {args.out}")
        finally:
            browser.close()


def settle(page, text: str) -> None:
    """Wait for ``text``, let the charts draw, and close the assistant side panel."""
    page.get_by_text(text).first.wait_for()
    page.wait_for_timeout(3000)
    if page.locator(ASSISTANT_CLOSE).count():
        page.locator(ASSISTANT_CLOSE).first.click()
        page.wait_for_timeout(1000)


def main() -> None:
    from mlflow import MlflowClient

    args = arguments("docs/mlflow-compare.png", "1600x1000")
    client = MlflowClient(args.tracking_uri)
    experiment = experiment_id(client, args)
    runs = client.search_runs(
        [experiment], "attributes.status = 'FINISHED'", order_by=["params.`train.learning_rate` ASC"]
    )
    if not runs:
        sys.exit(f"error: experiment {args.experiment!r} at {args.tracking_uri} has no finished run")
    query = f"runs={json.dumps([run.info.run_id for run in runs])}&experiments={json.dumps([experiment])}"
    with page_of(args) as page:
        page.goto(f"{args.tracking_uri.rstrip('/')}/#/compare-runs?{urllib.parse.quote(query, safe='=&')}")
        settle(page, "Comparing")
        if args.metric:
            # The plot's two multi-selects hold the parameters, then the metrics; each tag has a remove cross.
            removes = page.locator("[class*=select]:has(#dubois-select-2) [class*=select-selection-item-remove]")
            while removes.count():
                removes.first.click()
                page.wait_for_timeout(300)
            page.locator("#dubois-select-2").click()
            page.keyboard.insert_text(args.metric)
            page.wait_for_timeout(500)
            page.keyboard.press("Enter")
            page.keyboard.press("Escape")
            page.wait_for_timeout(2000)


if __name__ == "__main__":
    main()
