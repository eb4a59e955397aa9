"""Look at what the MLflow UI shows for a study, in a headless browser, and save screenshots.

For contributors who change what is logged: run a study, then

    pip install playwright                     # the Python driver only; no browser download
    apt-get install chromium                   # Debian's Chromium (or pass --chromium PATH)
    python tools/mlflow_ui_check.py --store runs/mlflow.db --experiment batch_size_sweep --out ui-shots

It starts `mlflow server` on a free 127.0.0.1 port, opens the experiment (it must land on the
runs table, not MLflow 3's GenAI view: see `ayt.tracking.EXPERIMENT_KIND`), checks that the
parent run and its children are listed, opens one child's model metrics and checks that a chart
renders for every evaluation metric it logged (FID, KID, precision, recall, ...: whatever
`eval.metrics` listed) and every diagnostic, and writes a PNG of each page. Exit code 0 when
every check passes.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Diagnostics a run may log (issues 14, 15): checked on the child's metrics page when it did.
DIAGNOSTIC_METRICS = ("eval/noise_scale", "eval/tangent/cos_all", "eval/tangent/osc_all")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe) if exe.exists() else "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{store.resolve()}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300         # a loaded 2-core machine takes minutes to import mlflow
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow server did not start: {log.read_text()[-2000:]}")


def check(store: Path, experiment: str, out: Path, chromium: str) -> list[str]:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {store}")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = _start_server(store, port, out / "server.log")
    problems: list[str] = []
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            # MLflow 3.17 picks the experiment view from its global GenAI / Model-training switch
            # (the URL's `workflowType`, remembered in the browser), not from the experiment's
            # tag; the README's link carries it.
            page.goto(f"{base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning",
                      wait_until="load", timeout=60000)
            page.wait_for_timeout(20000)
            # Parents list first; expand them so the children show too.
            for expander in page.locator("button[data-component-id*='runnamecellrenderer']").all():
                try:
                    expander.click(timeout=1000)
                except Exception:  # noqa: BLE001 - an expander that is already open
                    pass
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "experiment.png"), full_page=True)
            text = page.inner_text("body")
            if "Traces" in text and not any(r.info.run_name in text for r in parents):
                problems.append("the experiment opened on the GenAI/traces view, not the runs table")
            for run in parents + children[:3]:
                if run.info.run_name not in text:
                    problems.append(f"run {run.info.run_name} is not listed on the experiment page")
            study_ids = {r.info.run_id: r.info.run_name for r in parents}
            for run in children:
                # Children are named by their axis values (b16-mfd-s0-57f9), not by the study id,
                # which the runs table would cut to `batch_size_swe...` for every child alike.
                if run.info.run_name.startswith(study_ids.get(run.data.tags["mlflow.parentRunId"], "\0")):
                    problems.append(f"child {run.info.run_name} is named by its study id, not its axis values")
            if children:
                child = children[0]
                page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/model-metrics"
                          "?workflowType=machine_learning",
                          wait_until="load", timeout=60000)
                page.wait_for_timeout(20000)
                page.screenshot(path=str(out / "child_metrics.png"), full_page=True)
                body = page.inner_text("body")
                if "fid_1step" not in body:
                    problems.append("the child's metrics page shows no fid_1step chart")
                charts = page.locator("canvas, svg.main-svg, .js-plotly-plot").count()
                if charts == 0:
                    problems.append("no chart element rendered on the child's metrics page")
                # Every evaluation metric and diagnostic a run logged must each have a chart: MLflow
                # renders charts lazily (below the fold they are not in the page yet), so filter
                # with its search box.
                from ayt.eval.metrics import is_metric_key
                search = page.get_by_placeholder("Search metric charts")
                logged = sorted(k for k in child.data.metrics if is_metric_key(k))
                for key in [*logged, *DIAGNOSTIC_METRICS]:
                    if key not in child.data.metrics:
                        continue
                    name = key.rsplit("/", 1)[-1]
                    search.fill(name)
                    page.wait_for_timeout(3000)
                    page.screenshot(path=str(out / f"child_metric_{name}.png"), full_page=True)
                    if page.get_by_text(name, exact=True).count() == 0:
                        problems.append(f"the child logged {key} but its metrics page shows no {name} chart")
                search.fill("")
            for parent in parents[:1]:
                page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts"
                          "?workflowType=machine_learning", wait_until="load", timeout=60000)
                page.wait_for_timeout(10000)
                page.screenshot(path=str(out / "parent_artifacts.png"), full_page=True)
                if "report" not in page.inner_text("body"):
                    problems.append(f"the parent run {parent.info.run_name} lists no report/ artifact folder")
                    continue
                # Every figure the report logged is listed once the folder is opened.
                page.get_by_text("report", exact=True).first.click()
                page.wait_for_timeout(3000)
                page.screenshot(path=str(out / "parent_report_folder.png"), full_page=True)
                listed = page.inner_text("body")
                for item in client.list_artifacts(parent.info.run_id, "report"):
                    name = item.path.rsplit("/", 1)[-1]
                    if name.endswith(".png") and name not in listed:
                        problems.append(f"the parent's report/{name} is not listed on its artifacts page")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("runs/mlflow.db"))
    parser.add_argument("--experiment", default="batch_size_sweep")
    parser.add_argument("--out", type=Path, default=Path("ui-shots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    problems = check(args.store, args.experiment, args.out, args.chromium)
    for problem in problems:
        print(f"mlflow-ui: {problem}", file=sys.stderr)
    print(f"mlflow-ui: screenshots in {args.out}: " + ", ".join(p.name for p in sorted(args.out.glob("*.png"))))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
