"""The suite in a real browser: JupyterLab started as `make lab` starts it, driven by Playwright.

Each notebook (a copy, so the committed files stay clean) is opened, every cell is run with the
"Run All Cells" menu, the saved result must hold no error output other than the deliberate ones
(cells tagged raises-exception), and the interactive apps must render and update when a control
changes. Screenshots go to test-artifacts/browser/.

Needs Chromium (Debian's package: /usr/bin/chromium; .ci/run installs it) and the playwright
package (requirements.txt); without Chromium the test is skipped, except in CI where it fails.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Flags for a sandboxed, offline machine (no GPU, no background network, running as root).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

if CHROMIUM is None:
    pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason="Chromium is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab started with `make lab`, serving a copy of the notebooks; yields (base URL, token, folder)."""
    assert CHROMIUM, "Chromium is missing: install Debian's chromium package (.ci/run does)"
    folder = tmp_path_factory.mktemp("notebooks")
    for path in NOTEBOOKS:
        shutil.copy(path, folder / path.name)
    port = free_port()
    log = folder.parent / "lab.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(folder.parent / "runtime")}
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "-s", "lab", f"PORT={port}", f"NOTEBOOK_DIR={folder}"], cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        token = None
        deadline = time.monotonic() + 180
        while token is None and time.monotonic() < deadline:
            time.sleep(1)
            assert process.poll() is None, log.read_text()
            match = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=([0-9a-f]+)", log.read_text())
            token = match.group(1) if match else None
        assert token, log.read_text()
        yield f"http://127.0.0.1:{port}", token, folder
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_notebook(browser, lab, name):
    base, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)  # a busy 2-core machine renders slowly
    page.goto(f"{base}/lab/tree/{name}?token={token}")
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", timeout=120_000)
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
    try:  # JupyterLab asks which kernel when several are registered: take its (the suite's) default
        dialog.wait_for(timeout=5000)
        dialog.get_by_role("button", name="Select").click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started directly
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    return page


def run_all_and_save(page, timeout_s: float = 600) -> None:
    """Click Run > Run All Cells, wait until the kernel is idle with no cell pending, then save."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + timeout_s
    page.wait_for_timeout(2000)
    while time.monotonic() < deadline:
        busy = page.locator(".jp-Notebook-ExecutionIndicator[data-status='busy']").count()
        pending = page.locator(".jp-InputPrompt:has-text('[*]')").count()
        if not busy and not pending:
            break
        page.wait_for_timeout(1000)
    else:
        raise AssertionError("the notebook did not finish running in time")
    page.keyboard.press("Control+s")
    page.wait_for_timeout(1500)


def unexpected_errors(path: Path) -> list[str]:
    """Error outputs of cells not tagged raises-exception, and code cells that never ran."""
    problems = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code":
            continue
        deliberate = "raises-exception" in cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            if out["output_type"] == "error" and not deliberate:
                problems.append(f"cell {i}: {out['ename']}: {out['evalue'][:200]}")
        if cell.get("execution_count") is None and cell["source"]:
            problems.append(f"cell {i} never ran")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_jupyterlab(browser, lab, path):
    page = open_notebook(browser, lab, path.name)
    try:
        run_all_and_save(page)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{path.stem}.png")
        problems = unexpected_errors(lab[2] / path.name)
        assert not problems, "\n".join(problems)
    finally:
        page.close()


APPS = {  # notebook -> (CSS class of the app, description of a control to change, CSS class of its output)
    "01_memory_math.ipynb": ("memory-calculator", "Dtype", "memory-calculator-result"),
    "05_dispatch.ipynb": ("device-map-explorer", "GPU 0 budget (GiB)", "device-map-explorer-plan"),
}


@pytest.mark.parametrize("name", sorted(APPS))
def test_app_renders_and_updates(browser, lab, name):
    app_class, control, output_class = APPS[name]
    page = open_notebook(browser, lab, name)
    try:
        run_all_and_save(page)
        app = page.locator(f".{app_class}").first
        app.scroll_into_view_if_needed()
        assert app.is_visible(), f"the {app_class} app did not render"
        output = page.locator(f".{output_class}").first
        before = output.inner_text()
        widget = app.locator(".widget-inline-hbox", has=page.locator(f"label:text-is('{control}')")).first
        if widget.locator("select").count():  # a dropdown: pick another option
            select = widget.locator("select")
            current = select.input_value()
            options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
            select.select_option(value=next(v for v in options if v != current))
        else:  # a slider: type a new value into its readout, as a presenter would
            readout = widget.locator(".widget-readout")
            current = int(float(readout.inner_text()))
            readout.click()
            page.keyboard.press("Control+a")
            page.keyboard.type(str(current // 2 if current >= 2 else current + 1))
            page.keyboard.press("Enter")
        after = output.inner_text()
        for _ in range(40):  # the kernel recomputes (a 70B plan, a device map drawn): allow up to 20 s on 2 cores
            if after != before:
                break
            page.wait_for_timeout(500)
            after = output.inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        app.screenshot(path=ARTIFACTS / f"{Path(name).stem}-app.png")
        assert after != before, "the app's output did not change when the control changed"
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{Path(name).stem}-app-failure.png", full_page=True)
        raise
    finally:
        page.close()
