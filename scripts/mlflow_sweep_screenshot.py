"""Screenshot MLflow's runs table with a sweep expanded to its trials, for the README (docs/mlflow-sweep.png).

Usage, with an MLflow server holding a sweep made by ``mnist-sweep``::

    python scripts/mlflow_sweep_screenshot.py --tracking-uri http://127.0.0.1:5000 --out docs/mlflow-sweep.png

It opens the experiment's runs table in headless Chromium (Debian's ``chromium``), closes the
assistant side panel, and clicks the expand control of the newest sweep's row (the sweep's run is
the parent of its trials' runs), the way a person would. The browser is driven with the DevTools
helpers of ``mlflow_compare_screenshot.py``.
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow_compare_screenshot  # noqa: E402
from mlflow_compare_screenshot import CHROMIUM_FLAGS, DevTools  # noqa: E402

# The runs table can take a while to load on a busy machine; every wait is bounded by this.
PAGE_TIMEOUT = mlflow_compare_screenshot.PAGE_TIMEOUT = 240


def experiment_url(tracking_uri: str, experiment: str) -> tuple[str, str]:
    """The runs-table URL of ``experiment`` and the name of its newest sweep run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"error: {tracking_uri} has no experiment {experiment!r}")
    sweeps = client.search_runs(
        [found.experiment_id], "tags.`sweep.name` != '' and tags.`mlflow.runName` LIKE 'sweep %'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    if not sweeps:
        sys.exit(f"error: experiment {experiment!r} at {tracking_uri} has no sweep run")
    return f"{tracking_uri.rstrip('/')}/#/experiments/{found.experiment_id}/runs", sweeps[0].info.run_name


async def screenshot(url: str, sweep: str, out: Path, width: int, height: int, chromium: str) -> None:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="mlflow-screenshot-profile.")
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
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
            await page.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for(f"document.body && document.body.innerText.includes({json.dumps(sweep)})", sweep)
            await asyncio.sleep(3)
            await page.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
            await asyncio.sleep(1)
            # The expand control sits in the same table row as the sweep run's name.
            expanded = await page.evaluate(
                "(() => { const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === "
                f"{json.dumps(sweep)}); if (!link) return false; let row = link;"
                " while (row && !(row.getAttribute && row.getAttribute('role') === 'row')) row = row.parentElement;"
                " const button = row && (row.querySelector('[aria-label*=xpand]') || row.querySelector('button'));"
                " if (!button) return false;"
                " button.click(); return true; })()"
            )
            if not expanded:
                print("note: found no expand control in the sweep's row", file=sys.stderr)
            await asyncio.sleep(3)
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
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    parser.add_argument("--experiment", default="mnist-softmax")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-sweep.png"))
    parser.add_argument("--size", default="1600x900", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    width, height = (int(value) for value in args.size.lower().split("x"))
    url, sweep = experiment_url(args.tracking_uri, args.experiment)
    asyncio.run(screenshot(url, sweep, args.out, width, height, args.chromium))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
