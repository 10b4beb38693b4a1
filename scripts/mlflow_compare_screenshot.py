"""Screenshot MLflow's run-comparison page for the README (docs/mlflow-compare.png).

Usage, with an MLflow server holding the sweep's runs (``mlflow server --backend-store-uri
sqlite:///$PWD/mlflow.db --port 5000``)::

    python scripts/mlflow_compare_screenshot.py --tracking-uri http://127.0.0.1:5000 --out docs/mlflow-compare.png

It compares every finished run of the experiment (``mnist-softmax`` unless ``--experiment`` says
otherwise), in the order of their learning rates, the way a person would: it opens
``#/compare-runs?runs=[...]&experiments=[...]`` in headless Chromium (Debian's ``chromium``
package), closes the assistant side panel, and puts ``--metric`` (final test accuracy) on the
parallel-coordinates plot instead of the first metric MLflow happens to pick. Chromium is driven
through its DevTools protocol over a websocket with aiohttp, which DVC already brings along.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # This machine reaches no outside host; without these Chromium keeps trying and failing.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Every wait below is bounded by this many seconds.
PAGE_TIMEOUT = 60


def compare_url(tracking_uri: str, experiment: str) -> tuple[str, list[str]]:
    """The compare-runs URL of every finished run of ``experiment``, lowest learning rate first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"error: {tracking_uri} has no experiment {experiment!r}")
    runs = client.search_runs(
        [found.experiment_id], "attributes.status = 'FINISHED'", order_by=["params.`train.learning_rate` ASC"]
    )
    if not runs:
        sys.exit(f"error: experiment {experiment!r} at {tracking_uri} has no finished run")
    run_ids = [run.info.run_id for run in runs]
    query = f"runs={json.dumps(run_ids)}&experiments={json.dumps([found.experiment_id])}"
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?{urllib.parse.quote(query, safe='=&')}", run_ids


class DevTools:
    """The few DevTools-protocol commands this script needs, over one page's websocket."""

    def __init__(self, websocket) -> None:
        self.websocket = websocket
        self.last_id = 0

    async def call(self, method: str, **params):
        self.last_id += 1
        await self.websocket.send_json({"id": self.last_id, "method": method, "params": params})
        async with asyncio.timeout(PAGE_TIMEOUT):
            async for message in self.websocket:
                data = json.loads(message.data)
                if data.get("id") == self.last_id:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})
        raise RuntimeError(f"{method}: the browser closed the connection")

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str) -> None:
        deadline = time.monotonic() + PAGE_TIMEOUT
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {PAGE_TIMEOUT} s waiting for {what}")
            await asyncio.sleep(0.5)

    async def click(self, selector: str, index: int = 0) -> bool:
        """Click the centre of the ``index``-th element matching ``selector``, as a mouse would."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelectorAll({json.dumps(selector)})[{index}];"
            " if (!e) return null; const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        if not box:
            return False
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)
        return True

    async def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


async def show_metric(page: DevTools, metric: str) -> None:
    """Replace the parallel-coordinates plot's metric with ``metric`` through its select box."""
    # The plot's two multi-selects are parameters, then metrics; each tag has a remove cross.
    metrics_select = "[class*=select]:has(#dubois-select-2)"
    while await page.click(f"{metrics_select} [class*=select-selection-item-remove]"):
        await asyncio.sleep(0.3)
    await page.click("#dubois-select-2")
    await page.call("Input.insertText", text=metric)
    await asyncio.sleep(0.5)
    await page.key("Enter", 13)
    await page.key("Escape", 27)


async def screenshot(url: str, out: Path, width: int, height: int, metric: str, chromium: str) -> None:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="mlflow-screenshot-profile.")
    browser = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Chromium writes the port it picked into the profile once DevTools listens.
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + PAGE_TIMEOUT
        while not (port_file.exists() and port_file.read_text().strip()):
            if browser.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{chromium} did not start (exit code {browser.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        websocket_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(websocket_url, max_msg_size=0) as websocket:
            page = DevTools(websocket)
            # --window-size includes the (invisible) browser frame; the page itself gets exactly this.
            await page.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for("document.body && document.body.innerText.includes('Comparing')", "the comparison page")
            # Let the charts draw before touching them.
            await asyncio.sleep(3)
            if not await page.click('[data-component-id="mlflow.assistant.chat_panel.close"]'):
                print("note: no assistant panel to close", file=sys.stderr)
            await asyncio.sleep(1)
            if metric:
                await show_metric(page, metric)
                await asyncio.sleep(2)
            shot = await page.call("Page.captureScreenshot", format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
        help="URL of a running MLflow server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000)",
    )
    parser.add_argument("--experiment", default="mnist-softmax")
    parser.add_argument(
        "--metric",
        default="final_test_accuracy",
        help="metric for the parallel-coordinates plot; '' keeps MLflow's choice",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    parser.add_argument("--size", default="1600x1000", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    width, height = (int(value) for value in args.size.lower().split("x"))
    url, run_ids = compare_url(args.tracking_uri, args.experiment)
    print(f"comparing {len(run_ids)} runs: {url}")
    asyncio.run(screenshot(url, args.out, width, height, args.metric, args.chromium))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
