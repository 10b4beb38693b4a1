"""Screenshot MLflow's runs table with the newest sweep expanded to its trials (docs/mlflow-sweep.png).

With an MLflow server holding a sweep made by ``mnist-sweep``::

    uv run python scripts/mlflow_sweep_screenshot.py --tracking-uri http://127.0.0.1:5000

It opens the experiment's runs table as mlflow_compare_screenshot.py opens its page, and clicks the
expand control in the row of the newest sweep's run (the parent of its trials' runs).
"""

from __future__ import annotations

import sys

from mlflow_compare_screenshot import arguments, experiment_id, page_of, settle


def main() -> None:
    from mlflow import MlflowClient

    args = arguments("docs/mlflow-sweep.png", "1600x900")
    client = MlflowClient(args.tracking_uri)
    experiment = experiment_id(client, args)
    sweeps = client.search_runs(
        [experiment],
        "tags.`sweep.name` != '' and tags.`mlflow.runName` LIKE 'sweep %'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not sweeps:
        sys.exit(f"error: experiment {args.experiment!r} at {args.tracking_uri} has no sweep run")
    sweep = sweeps[0].info.run_name
    with page_of(args) as page:
        page.goto(f"{args.tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs")
        settle(page, sweep)
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=sweep, exact=True))
        expand = row.locator("[aria-label*=xpand]").or_(row.locator("button")).first
        if expand.count():
            expand.click()
            page.wait_for_timeout(3000)
        else:
            print("note: found no expand control in the sweep's row", file=sys.stderr)


if __name__ == "__main__":
    main()
