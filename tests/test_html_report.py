"""The Snakemake HTML report of a demo run, opened in headless Chromium.

The page must load without JavaScript errors, list one category per model (plus the summary and,
with two model families, the family comparison), carry every report item the rules declare, and
show a plot and a table when clicked.

Cost: the report is built from the session's demo run (the `demo_run` fixture of conftest.py,
shared with tests/test_workflow.py), so this file adds only the report and the browser. Set
``VLMSENS_DEMO_WORKDIR`` to a folder where the demo already ran (the repository root after
``make demo``) to reuse it instead: only missing or outdated outputs are made there
(``--rerun-triggers mtime``), then the report is built.

Chromium: Debian packages ``chromium`` and ``chromium-driver``; installed with apt-get when
missing and running as root (CI), otherwise the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import CPU_DEMO, DEMO, snakemake

DEMO_ENV = "VLMSENS_DEMO_WORKDIR"
CHROME_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)
PER_MODEL_ITEMS = (
    "sensitivity.png", "rank_stability.png", "rank_stability.html", "format_comparison.png", "format_comparison.html",
    "scope_comparison.png", "scope_comparison.html", "towers_distribution.png", "towers_share.png", "towers.html",
    "recipes.png", "validation.png",
)
SUBCATEGORIES = (
    "Per-group sensitivity", "(a) Rank stability across sizes", "(b) Format comparison (FP8 vs INT8)",
    "(c) LM-only vs all-layers", "(d) Towers: vision / text / head", "(e) Heatmaps: block × sublayer",
    "Recipes per effective-bits budget", "(g) Validation of the ranking", "Exported checkpoints",
)

pytestmark = pytest.mark.workflow


# ---------------------------------------------------------------------------------------------
# Chromium


def _find_chrome() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None
    )
    return browser, driver


@pytest.fixture(scope="session")
def chrome() -> tuple[str, str]:
    pytest.importorskip("selenium")
    browser, driver = _find_chrome()
    if not (browser and driver):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("needs headless Chromium: install the Debian packages chromium and chromium-driver")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        browser, driver = _find_chrome()
        if not (browser and driver):
            pytest.fail("apt-get installed chromium and chromium-driver, but no chromium / chromedriver binary is on PATH")
    return browser, driver


@pytest.fixture
def browser(chrome):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chrome
    options = Options()
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    profile = tempfile.mkdtemp(prefix="vlmsens-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never goes to the network.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A demo run and its report


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, chrome, request) -> tuple[Path, dict]:
    """(report.html, the config it was made from), from the session's demo run or a reused one."""
    out = tmp_path_factory.mktemp("html_report")
    reused = os.environ.get(DEMO_ENV)
    if reused:
        workdir = Path(reused).resolve()
        snakemake(workdir, *DEMO, *CPU_DEMO, "--rerun-triggers", "mtime")
    else:
        workdir, _ = request.getfixturevalue("demo_run")  # after `chrome`: no demo run when the browser skips
    config = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    report = out / "report.html"
    snakemake(workdir, *DEMO, "--report", str(report))
    assert report.stat().st_size > 100_000
    return report, config


# ---------------------------------------------------------------------------------------------
# Tests


def _severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _open(driver, report: Path) -> None:
    driver.get(report.as_uri())
    deadline = time.time() + 60
    while time.time() < deadline:
        if driver.execute_script("return typeof categories !== 'undefined' && typeof results !== 'undefined'"):
            return
        time.sleep(0.2)
    raise AssertionError("the report's data (categories, results) never loaded")


def test_report_loads_without_javascript_errors_and_lists_every_item(browser, demo_report):
    report, config = demo_report
    _open(browser, report)
    assert browser.title == "Snakemake Report"
    models = config["grid"]["models"]
    families = {config["models"][m]["family"] for m in models}
    categories = browser.execute_script("return Object.keys(categories)")
    expected = {"Summary", "Ship this", *models} | ({"Model families"} if len(families) >= 2 else set())
    assert set(categories) == expected, categories
    names = Counter(browser.execute_script("return Object.values(results).map(r => r.name)"))
    n_cells = len(models) * len(config["grid"]["formats"]) * len(config["grid"]["scopes"]) * len(config["grid"]["sizes"])
    assert names["summary.html"] == 1 and names["validation.html"] == 1
    for item in PER_MODEL_ITEMS:
        assert names[item] == len(models), (item, names)
    assert names["heatmap.png"] == n_cells
    assert names["ship_this.html"] == len(models)
    if config.get("ship_this", {}).get("ladder", {}).get("enabled"):
        assert names["damage_vs_bits.png"] == len(models) and names["loss_vs_bits.png"] == len(models)
    assert names["recipes.html"] == n_cells + len(models)  # one per cell, one summary per model
    if len(families) >= 2:
        assert names["depth_profile.png"] == 1 and names["depth_profile.html"] == 1
    # Labels are strings (the page sorts them with localeCompare) and carry format / scope / size.
    labels = browser.execute_script("return Object.values(results).map(r => r.labels)")
    for label in labels:
        assert set(label) == {"item", "format", "scope", "size"} and all(isinstance(v, str) for v in label.values()), label
    assert not _severe(browser), _severe(browser)


def test_clicking_through_a_model_shows_its_analyses(browser, demo_report):
    from selenium.webdriver.common.by import By

    report, config = demo_report
    model = config["grid"]["models"][0]
    _open(browser, report)
    browser.find_element(By.XPATH, f"//*[normalize-space(text())='{model}']").click()
    body = browser.find_element(By.TAG_NAME, "body").text
    for subcategory in SUBCATEGORIES:
        assert subcategory in body, (subcategory, body[:2000])

    # The heatmaps: one row per cell, labelled by format / scope / size; the eye shows the PNG.
    browser.find_element(By.XPATH, "//*[starts-with(normalize-space(text()),'(e) Heatmaps')]").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "table tbody tr")
    n_cells = len(config["grid"]["formats"]) * len(config["grid"]["scopes"]) * len(config["grid"]["sizes"])
    assert len(rows) == n_cells
    header = browser.find_element(By.CSS_SELECTOR, "table thead").text.upper()
    assert all(label in header for label in ("ITEM", "FORMAT", "SCOPE", "SIZE"))
    rows[0].find_element(By.CSS_SELECTOR, "a[iconname=eye]").click()
    time.sleep(0.5)
    sources = [img.get_attribute("src") or "" for img in browser.find_elements(By.TAG_NAME, "img")]
    assert any(src.startswith("data:image/png") for src in sources), [s[:40] for s in sources]

    # A table page (HTML) opens in a frame and holds a table.
    browser.find_element(By.XPATH, f"//*[normalize-space(text())='{model}']").click()
    browser.find_element(By.XPATH, "//*[starts-with(normalize-space(text()),'(b) Format comparison')]").click()
    row = browser.find_element(By.XPATH, "//tr[td[contains(., '(table)')]]")
    row.find_element(By.CSS_SELECTOR, "a[iconname=eye]").click()
    time.sleep(0.5)
    frames = browser.find_elements(By.TAG_NAME, "iframe")
    assert frames, "the HTML table did not open in a frame"
    browser.switch_to.frame(frames[0])
    assert "format comparison" in browser.find_element(By.TAG_NAME, "h1").get_attribute("textContent")
    assert browser.find_elements(By.TAG_NAME, "table")
    browser.switch_to.default_content()
    assert not _severe(browser), _severe(browser)
