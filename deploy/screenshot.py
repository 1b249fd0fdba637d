"""Screenshot a finished flow run's page in the Prefect UI with headless Chromium.

    python deploy/screenshot.py [--api-url http://127.0.0.1:4200/api] [--flow-run-id ID]
                                [--tab Artifacts] [--out docs/prefect-flow-run.png]

Without ``--flow-run-id`` it takes the latest completed ``compress-matrix`` run. Needs
Chromium and its driver (Debian: ``apt install chromium chromium-driver``) and Selenium
(``pip install 'lplr-dask[ui]'``); the server must be running (``prefect server start``).
The UI is a single-page app that only shows a run's tabs once the run has loaded, so the
script waits for the tab, clicks it, waits for its content, then takes the screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path


def _post(url: str, body: dict):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def latest_run(api_url: str, flow_name: str) -> str:
    runs = _post(
        f"{api_url}/flow_runs/filter",
        {
            "flows": {"name": {"any_": [flow_name]}},
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
            "sort": "END_TIME_DESC",
            "limit": 1,
        },
    )
    if not runs:
        sys.exit(f"no completed {flow_name!r} flow run on {api_url}; run a flow first.")
    return runs[0]["id"]


def screenshot(url: str, out: Path, *, tab: str | None, expect: str, width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    driver_path = shutil.which("chromedriver")
    if not driver_path:
        sys.exit("no chromedriver on PATH: install chromium-driver (Debian) or ChromeDriver.")
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(driver_path))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        if tab:
            tab_id = tab.lower().replace(" ", "-")  # the UI's tabs: <li class="p-tab" id=...>
            button = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"li.p-tab#{tab_id}")))
            button.click()
        if expect:
            wait.until(
                ec.presence_of_element_located(
                    (By.XPATH, f"//*[not(*) and contains(., '{expect}')]")
                )
            )
        time.sleep(2)  # let charts and fonts settle
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--api-url", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    )
    p.add_argument("--flow-run-id")
    p.add_argument("--flow-name", default="compress-matrix")
    p.add_argument("--tab", default="Artifacts", help="Logs, Task Runs, Artifacts, Details ...")
    p.add_argument("--out", type=Path, default=Path("docs/prefect-flow-run.png"))
    p.add_argument("--expect", default="lplr-result", help="text to wait for on the tab")
    p.add_argument(
        "--artifact",
        metavar="KEY",
        help="screenshot this artifact of the run (such as lplr-result) instead of the run page",
    )
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1300)
    args = p.parse_args(argv)
    api = args.api_url.rstrip("/")
    run_id = args.flow_run_id or latest_run(api, args.flow_name)
    ui = api.removesuffix("/api")
    url, tab = f"{ui}/runs/flow-run/{run_id}", args.tab
    if args.artifact:
        found = _post(
            f"{api}/artifacts/filter",
            {"artifacts": {"key": {"any_": [args.artifact]}, "flow_run_id": {"any_": [run_id]}}},
        )
        if not found:
            sys.exit(f"flow run {run_id} has no artifact {args.artifact!r}.")
        url, tab = f"{ui}/artifacts/artifact/{found[0]['id']}", None
    screenshot(url, args.out, tab=tab, expect=args.expect, width=args.width, height=args.height)
    print(f"{url} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
