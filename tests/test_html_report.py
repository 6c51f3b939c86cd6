"""The Snakemake HTML report of a demo run, opened in headless Chromium.

The page must load without JavaScript errors and open on the front page (what was run, the
verdicts); list its categories in reading order (the summary, each model in the grid's order, the
family comparison) and each model's sections in order; carry every report item the rules declare,
the layer table and validation page of every cell included; show a plot, an interactive plot and a
table when clicked; and let a wide table scroll. Screenshots of each step are checked for content.

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
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import CPU_DEMO, DEMO, snakemake

try:
    from selenium.webdriver.common.by import By
except ImportError:  # the `chrome` fixture skips these tests without selenium
    By = None

DEMO_ENV = "VLMSENS_DEMO_WORKDIR"
CHROME_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)
PER_MODEL_ITEMS = (
    "sensitivity.png", "sensitivity.html", "heatmaps.png", "heatmaps.html", "rank_stability.png", "rank_stability.html",
    "format_comparison.png", "format_comparison.html", "scope_comparison.png", "scope_comparison.html",
    "towers_distribution.png", "towers_share.png", "towers.html", "recipes.png", "validation.png",
)
# A model's sections, in the order the report lists them.
SECTIONS = (
    "Per-group sensitivity", "Heatmaps: block × sublayer", "Layers per cell", "Recipes per effective-bits budget",
    "Exported checkpoints", "Rank stability across sizes", "Format comparison (FP8 vs INT8)", "LM-only vs all-layers", "Towers: vision / text / head",
    "Validation of the ranking", "Validation per cell",
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
    """(report.html, the config it was made from), from the session's demo run or a reused one.

    The report is Snakemake's zip form (`--report report.zip`, unpacked here), as `make demo` makes it:
    in a single HTML file every result is a data URL, and Chromium refuses to open one over 2 MB in
    a frame, which the interactive pages (plotly.js inlined) are."""
    out = tmp_path_factory.mktemp("html_report")
    reused = os.environ.get(DEMO_ENV)
    if reused:
        workdir = Path(reused).resolve()
        snakemake(workdir, *DEMO, *CPU_DEMO, "--rerun-triggers", "mtime")
    else:
        workdir, _ = request.getfixturevalue("demo_run")  # after `chrome`: no demo run when the browser skips
    config = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    archive = out / "report.zip"
    snakemake(workdir, *DEMO, "--report", str(archive))
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(out)
    report = out / "report" / "report.html"
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


def _menu(driver) -> list[str]:
    """The texts of the navigation's entries, top to bottom."""
    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, "nav li, #navbar li, ul li") if e.text.strip()]


def _shot(driver, path: Path) -> Path:
    """A screenshot that shows something: many colours, not a blank or one-colour page."""
    from PIL import Image

    driver.save_screenshot(str(path))
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, f"{path} looks blank ({len(colours)} colours)"
    return path


def _stripped(label: str) -> str:
    """A numbered report label without its number ("03 tiny_qwen3_vl" -> "tiny_qwen3_vl")."""
    number, _, name = label.partition(" ")
    assert number.isdigit(), label
    return name


def test_report_opens_on_the_front_page_and_lists_categories_in_reading_order(browser, demo_report, tmp_path):
    report, config = demo_report
    browser.set_window_size(1400, 1000)
    _open(browser, report)
    assert browser.title == "Snakemake Report"
    # The landing page: what was run and the verdicts, not a Python dict.
    deadline = time.time() + 30
    while "Verdicts" not in (body := browser.execute_script("return document.body.textContent")) and time.time() < deadline:
        time.sleep(0.3)
    for text in ("What was run", "Verdicts", "24 cells", "Bit budget", "Ranking vs measured damage", "Reading order"):
        assert text in body, (text, body[:1500])
    assert "{'models'" not in body and "Not applicable" not in body
    browser.execute_script("document.querySelectorAll('*').forEach(e => { e.scrollTop = 0; e.scrollLeft = 0; })")
    _shot(browser, tmp_path / "front_page.png")

    models = config["grid"]["models"]
    families = {config["models"][m]["family"] for m in models}
    categories = browser.execute_script("return Object.keys(categories).sort((a, b) => a.localeCompare(b))")
    expected = ["Summary", "Ship this", *models] + (["Model families"] if len(families) >= 2 else [])
    assert [_stripped(c) for c in categories] == expected, categories  # the report's own (alphabetical) order
    menu = _menu(browser)
    assert [i for i, text in enumerate(menu) if text in categories] == sorted(menu.index(c) for c in categories)

    # A model's sections in order, the same for every model.
    for category in categories[2:2 + len(models)]:
        sections = browser.execute_script(
            "return Object.keys(categories[arguments[0]]).sort((a, b) => a.localeCompare(b))", category)
        assert [_stripped(s) for s in sections] == list(SECTIONS), sections
    summary = browser.execute_script("return Object.keys(categories[arguments[0]]).sort((a, b) => a.localeCompare(b))",
                                     categories[0])
    assert [_stripped(s) for s in summary] == ["Front page", "Cells", "Validation of rankings"], summary
    assert not _severe(browser), _severe(browser)


def test_report_loads_without_javascript_errors_and_lists_every_item(browser, demo_report):
    report, config = demo_report
    _open(browser, report)
    models = config["grid"]["models"]
    families = {config["models"][m]["family"] for m in models}
    names = Counter(browser.execute_script("return Object.values(results).map(r => r.name)"))
    n_cells = len(models) * len(config["grid"]["formats"]) * len(config["grid"]["scopes"]) * len(config["grid"]["sizes"])
    assert names["summary.html"] == 1 and names["validation.html"] == 1 and names["front_page.html"] == 1
    for item in PER_MODEL_ITEMS:
        assert names[item] == len(models), (item, names)
    # Every cell's layer table and validation page are in the report.
    assert names["layers.html"] == n_cells and names["cell_validation.html"] == n_cells
    assert names["recipes.html"] == n_cells + len(models)  # one per cell, one summary per model
    assert names["ship_this.html"] == len(models)
    if config.get("ship_this", {}).get("ladder", {}).get("enabled"):
        assert names["damage_vs_bits.png"] == len(models) and names["loss_vs_bits.png"] == len(models)
    if len(families) >= 2:
        assert names["depth_profile.png"] == 1 and names["depth_profile.html"] == 1
    # Labels are strings (the page sorts them with localeCompare) and carry format / scope / size.
    labels = browser.execute_script("return Object.values(results).map(r => r.labels)")
    for label in labels:
        assert set(label) == {"item", "format", "scope", "size"} and all(isinstance(v, str) for v in label.values()), label
    assert not _severe(browser), _severe(browser)


def _category(driver, name: str) -> str:
    """Open the category whose label ends with ``name``; returns its label."""
    label = next(c for c in driver.execute_script("return Object.keys(categories)") if _stripped(c) == name)
    driver.find_element(By.XPATH, f"//*[normalize-space(text())='{label}']").click()
    return label


def _section(driver, category: str, name: str) -> None:
    """Open the section (subcategory) ``name`` of the open category ``category`` (its label)."""
    labels = driver.execute_script("return Object.keys(categories[arguments[0]])", category)
    label = next(s for s in labels if _stripped(s) == name)
    driver.find_element(By.XPATH, f"//*[normalize-space(text())='{label}']").click()


def _open_item(driver, item: str):
    """Click the eye of the row whose item label is ``item``; returns the frame it opened, if any."""
    row = driver.find_element(By.XPATH, f"//tr[td[normalize-space(.)='{item}']]")
    row.find_element(By.CSS_SELECTOR, "a[iconname=eye]").click()
    time.sleep(1.0)
    frames = driver.find_elements(By.TAG_NAME, "iframe")
    return frames[0] if frames else None


def test_clicking_through_a_model_shows_its_analyses(browser, demo_report, tmp_path):
    report, config = demo_report
    model = config["grid"]["models"][0]
    browser.set_window_size(1400, 1000)
    _open(browser, report)
    category = _category(browser, model)
    body = browser.find_element(By.TAG_NAME, "body").text
    for section in SECTIONS:
        assert section in body, (section, body[:2000])

    # The layer tables: one row per cell, labelled by format / scope / size; the eye shows the table.
    _section(browser, category, "Layers per cell")
    rows = browser.find_elements(By.CSS_SELECTOR, "table tbody tr")
    n_cells = len(config["grid"]["formats"]) * len(config["grid"]["scopes"]) * len(config["grid"]["sizes"])
    assert len(rows) == n_cells
    header = browser.find_element(By.CSS_SELECTOR, "table thead").text.upper()
    assert all(label in header for label in ("ITEM", "FORMAT", "SCOPE", "SIZE"))
    rows[0].find_element(By.CSS_SELECTOR, "a[iconname=eye]").click()
    time.sleep(1.0)
    frames = browser.find_elements(By.TAG_NAME, "iframe")
    assert frames, "the layer table did not open in a frame"
    browser.switch_to.frame(frames[0])
    assert "every group" in browser.find_element(By.TAG_NAME, "h1").get_attribute("textContent")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table tbody tr")) > 10
    browser.switch_to.default_content()
    _shot(browser, tmp_path / "layers.png")

    # The heatmaps: the PNG, then the interactive page with plotly loaded and drawn.
    category = _category(browser, model)
    _section(browser, category, "Heatmaps: block × sublayer")
    _open_item(browser, "heatmaps, one colour scale (plot)")
    time.sleep(0.5)
    loaded = [img.get_attribute("src") for img in browser.find_elements(By.TAG_NAME, "img")
              if (img.get_attribute("src") or "").endswith(".png") and browser.execute_script("return arguments[0].naturalWidth", img) > 0]
    assert loaded, "the heatmaps PNG did not load"
    _shot(browser, tmp_path / "heatmaps_png.png")
    category = _category(browser, model)
    _section(browser, category, "Per-group sensitivity")
    frame = _open_item(browser, "sensitivity by group (interactive)")
    assert frame is not None, "the interactive page did not open in a frame"
    browser.switch_to.frame(frame)
    deadline = time.time() + 30
    while time.time() < deadline and not browser.execute_script(
            "return typeof Plotly !== 'undefined' && document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > 0"):
        time.sleep(0.3)
    assert browser.execute_script("return document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length") > 0
    browser.switch_to.default_content()
    _shot(browser, tmp_path / "sensitivity_interactive.png")

    # A table page (HTML) opens in a frame and holds a table.
    category = _category(browser, model)
    _section(browser, category, "Format comparison (FP8 vs INT8)")
    frame = _open_item(browser, "agreement and largest rank flips (table)")
    assert frame is not None, "the HTML table did not open in a frame"
    browser.switch_to.frame(frame)
    assert "format comparison" in browser.find_element(By.TAG_NAME, "h1").get_attribute("textContent")
    assert "Largest rank flips" in browser.find_element(By.TAG_NAME, "body").text
    browser.switch_to.default_content()
    assert not _severe(browser), _severe(browser)


def test_a_wide_table_scrolls_instead_of_being_cut(browser, demo_report, tmp_path):
    report, _ = demo_report
    browser.set_window_size(1000, 900)
    _open(browser, report)
    category = _category(browser, "Summary")
    _section(browser, category, "Validation of rankings")
    frame = _open_item(browser, "verdict per cell (table)")
    assert frame is not None
    browser.switch_to.frame(frame)
    boxes = browser.find_elements(By.CSS_SELECTOR, ".table-scroll")
    assert boxes, "tables are not in a scroll box"
    widest = max(boxes, key=lambda b: browser.execute_script("return arguments[0].scrollWidth", b))
    scroll_width, client_width = browser.execute_script("return [arguments[0].scrollWidth, arguments[0].clientWidth]", widest)
    assert scroll_width > client_width, "the widest table fits: the test needs a wider one or a narrower window"
    assert browser.execute_script("return getComputedStyle(arguments[0]).overflowX", widest) == "auto"
    last = widest.find_elements(By.CSS_SELECTOR, "thead th")[-1]
    right_edge = browser.execute_script("return arguments[0].getBoundingClientRect().right", last)
    assert right_edge > client_width  # beyond the box before scrolling
    browser.execute_script("arguments[0].scrollLeft = arguments[0].scrollWidth", widest)
    assert browser.execute_script("return arguments[0].scrollLeft", widest) > 0
    right_edge = browser.execute_script("return arguments[0].getBoundingClientRect().right", last)
    assert right_edge <= browser.execute_script("return arguments[0].getBoundingClientRect().right", widest) + 1
    browser.switch_to.default_content()
    _shot(browser, tmp_path / "wide_table.png")
    assert not _severe(browser), _severe(browser)
