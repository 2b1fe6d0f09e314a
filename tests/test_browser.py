"""The suite in a real browser, every notebook run twice in one kernel: JupyterLab as `make lab` starts it, Playwright.

Each notebook (a copy, so the committed files stay clean) is opened in a workspace of its own (nothing else
open), every cell is run with the "Run All Cells" menu, the saved result must hold no error output other than
the deliberate ones (cells tagged raises-exception) and no cell that never ran. Then Run All again in the same
kernel, as a presenter re-running a notebook does, with the same checks, and the repository must hold no new or
changed file (the notebooks write only into the git-ignored cache). Where the notebook has an interactive app,
it must render and update when a control changes. The kernel is shut down and the tab closed afterwards.

Every selector is scoped to the notebook's own panel, and completion is read from the kernel's state through
JupyterLab's REST API as well as from the panel's prompts, so nothing depends on what else the page holds.
Screenshots go to test-artifacts/browser/.

The presenter's notebook (00) is also shown as slides: after a Run All, the RISE slideshow is started as the README
says (Alt+R in the notebook: RISE's "Render as Reveal Slideshow" preview), then the same slideshow is opened in a
projector-sized window and stepped through with the space bar, one screenshot per step, until the last one; the
number of steps must be the number of slides, subslides and fragments its cells' slide metadata declares.

Needs Chromium (Debian's package: /usr/bin/chromium; .ci/run installs it) and the playwright package
(requirements.txt). `make test-all` runs it (and fails without Chromium, saying so); `make test` leaves it out.
"""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from lab_server import make_lab

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Flags for a sandboxed, offline machine (no GPU, no background network, running as root).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
RUN_TIMEOUT_S = 900  # one Run All of the slowest notebook on a loaded 2-core machine, with a wide margin
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"

APPS = {  # notebook -> (CSS class of the app, description of a control to change, CSS class of its output)
    "01_memory_math.ipynb": ("memory-calculator", "Dtype", "memory-calculator-result"),
    "05_dispatch.ipynb": ("device-map-explorer", "GPU 0 budget (GiB)", "device-map-explorer-plan"),
    "09_capstone_70b_on_a100.ipynb": ("inference-planner", "GPU", "inference-planner-result"),
}

SLIDESHOW = "00_demo.ipynb"  # the notebook presented as slides (RISE)
PROJECTOR = {"width": 1280, "height": 720}  # CSS pixels: a full-HD projector with the browser zoomed to 150%


def repository_state() -> str:
    """Paths git sees as changed or untracked (ignored files, such as the cache, are not listed)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


class Lab:
    """A running JupyterLab: its URL, token and notebook folder, and a small client for its REST API."""

    def __init__(self, base: str, token: str, folder: Path) -> None:
        self.base, self.token, self.folder = base, token, folder

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def session(self, name: str) -> dict | None:
        return next((s for s in self.api("sessions") if s["path"].endswith(name)), None)

    def kernel_state(self, name: str) -> str:
        session = self.session(name)
        return session["kernel"]["execution_state"] if session else "missing"

    def shut_down(self, name: str) -> None:
        """Shut the notebook's kernel down (deleting its session does that), so no kernel outlives its test."""
        session = self.session(name)
        if session:
            self.api(f"sessions/{session['id']}", method="DELETE")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab started with `make lab`, serving a copy of the notebooks."""
    assert CHROMIUM, "Chromium is missing: install Debian's chromium package (`apt-get install chromium`; .ci/run does)"
    folder = tmp_path_factory.mktemp("notebooks")
    for path in NOTEBOOKS:
        shutil.copy(path, folder / path.name)
    with make_lab(folder.parent, notebook_dir=folder) as (base, token):
        yield Lab(base, token, folder)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_notebook(browser, lab: Lab, name: str):
    """A new page showing only this notebook (a fresh workspace named after it), its kernel started and idle."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)  # a busy 2-core machine renders slowly
    workspace = re.sub(r"[^a-z0-9]+", "-", Path(name).stem.lower())
    page.goto(f"{lab.base}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab.token}")
    page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=120_000)
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
    try:  # JupyterLab asks which kernel when several are registered: take its (the suite's) default
        dialog.wait_for(timeout=5000)
        dialog.get_by_role("button", name="Select").click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started directly
        pass
    assert page.locator(PANEL).count() == 1, "the workspace holds more than this notebook"
    deadline = time.monotonic() + 120
    while lab.kernel_state(name) != "idle":
        assert time.monotonic() < deadline, f"the kernel of {name} did not start: {lab.kernel_state(name)}"
        page.wait_for_timeout(500)
    return page


def run_all_and_save(page, lab: Lab, name: str, after: int = 0) -> list[str]:
    """Click Run > Run All Cells, wait until every code cell shows an execution count above `after` (this run's),
    save; return the problems. On an error Run All stops: the wait ends at the timeout and the problems say why."""
    panel = page.locator(PANEL)
    expected = sum(1 for c in json.loads((lab.folder / name).read_text())["cells"]
                   if c["cell_type"] == "code" and "".join(c["source"]).strip())
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # Done when every code cell's prompt shows a count from this run and the kernel is idle. Neither the kernel's
    # state nor "[*]" prompts can say it alone: JupyterLab 4 marks queued cells "[ ]", and the kernel reports idle
    # for seconds between two cells (seen while a widget progress bar was shown). Prompts are read by their
    # textContent, which cells skipped from rendering (out of view) still have.
    while time.monotonic() < deadline:
        counts = panel.locator(".jp-CodeCell .jp-InputPrompt").evaluate_all(
            "ps => ps.map(p => parseInt((p.textContent.match(/\\[(\\d+)\\]/) || [0, '0'])[1]))")
        if sum(count > after for count in counts) >= expected and lab.kernel_state(name) == "idle":
            break
        page.wait_for_timeout(1000)
    before = (lab.folder / name).stat().st_mtime_ns
    panel.locator(".jp-Toolbar [data-command='docmanager:save']").first.click()  # the panel's own save button
    for _ in range(60):
        if (lab.folder / name).stat().st_mtime_ns != before:
            break
        page.wait_for_timeout(500)
    else:
        raise AssertionError(f"{name} was not saved")
    page.wait_for_timeout(500)  # let the write finish before reading it
    return unexpected_errors(lab.folder / name)


def execution_counts(path: Path) -> list[int]:
    return [c["execution_count"] for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "code" and c.get("execution_count") is not None]


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


def check_app(page, name: str) -> None:
    """The notebook's app is visible, and its output changes when a control changes (as a presenter would)."""
    app_class, control, output_class = APPS[name]
    panel = page.locator(PANEL)
    app = panel.locator(f".{app_class}").first
    app.scroll_into_view_if_needed()
    assert app.is_visible(), f"the {app_class} app did not render"
    output = panel.locator(f".{output_class}").first
    before = output.inner_text()
    widget = app.locator(".widget-inline-hbox", has=page.locator(f"label:text-is('{control}')")).first
    if widget.locator("select").count():  # a dropdown: pick another option
        select = widget.locator("select")
        current = select.input_value()
        options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
        select.select_option(value=next(v for v in options if v != current))
    else:  # a slider: type a new value into its readout
        readout = widget.locator(".widget-readout")
        current = int(float(readout.inner_text()))
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type(str(current // 2 if current >= 2 else current + 1))
        page.keyboard.press("Enter")
    after = output.inner_text()
    for _ in range(120):  # the kernel recomputes (a 70B plan, a device map drawn): up to 60 s on a loaded machine
        if after != before:
            break
        page.wait_for_timeout(500)
        after = output.inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app.screenshot(path=ARTIFACTS / f"{Path(name).stem}-app.png")
    assert after != before, f"the {app_class} app's output did not change when {control!r} changed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_twice_in_jupyterlab_and_writes_only_its_cache(browser, lab, path):
    before = repository_state()
    page = open_notebook(browser, lab, path.name)
    try:
        first_run = 0
        for run in ("first", "second"):
            problems = run_all_and_save(page, lab, path.name, after=first_run)
            assert not problems, f"{run} Run All:\n" + "\n".join(problems)
            counts = execution_counts(lab.folder / path.name)
            if run == "first":
                first_run = max(counts)
        assert min(counts) > first_run, "the second Run All did not run every cell again in the same kernel"
        if path.name in APPS:
            check_app(page, path.name)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{path.stem}.png")
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{path.stem}-failure.png", full_page=True)
        raise
    finally:
        lab.shut_down(path.name)
        page.close()
    assert repository_state() == before, "the notebook wrote files outside the git-ignored cache"


def slideshow_steps(path: Path) -> int:
    """How many steps the slideshow has: one per cell that starts a slide, a subslide or a fragment (RISE's rule).

    Cells without a slide type continue the current step; "skip" and "notes" cells are not shown.
    """
    types = [c.get("metadata", {}).get("slideshow", {}).get("slide_type", "-") for c in
             json.loads(path.read_text())["cells"]]
    shown = [t for t in types if t not in ("skip", "notes")]
    return sum(t in ("slide", "subslide", "fragment") for t in shown) + (shown[0] not in ("slide", "subslide"))


def slide_position(page) -> tuple:
    """Where the slideshow stands: Reveal's location (slide, subslide, fragment) and how many fragments show."""
    return page.evaluate("() => [location.hash, document.querySelectorAll('.reveal .slides .fragment.visible').length]")


def test_00_demo_runs_as_a_slideshow(browser, lab):
    """00 after a Run All: Alt+R shows the RISE slideshow; every step of it is visited and screenshotted."""
    path = ROOT / "notebooks" / SLIDESHOW
    page = open_notebook(browser, lab, SLIDESHOW)
    slides = None
    try:
        problems = run_all_and_save(page, lab, SLIDESHOW)
        assert not problems, "Run All:\n" + "\n".join(problems)
        panel = page.locator(PANEL)
        panel.locator(".jp-Cell").first.click()  # focus the notebook, then command mode, where Alt+R is bound
        page.keyboard.press("Escape")
        page.keyboard.press("Alt+r")  # RISE:preview, "Render as Reveal Slideshow"
        preview = page.locator("iframe[src*='/rise/']")
        preview.wait_for(timeout=120_000)
        deadline = time.monotonic() + 120
        while not any("/rise/" in f.url for f in page.frames):  # the iframe exists before its page loads
            assert time.monotonic() < deadline, "the slideshow preview did not load"
            page.wait_for_timeout(500)
        frame = next(f for f in page.frames if "/rise/" in f.url)
        frame.wait_for_selector(".reveal .slides section.present", timeout=120_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{path.stem}-slideshow-started.png")
        # The same slideshow in a window of its own (RISE's "Open as Reveal Slideshow"), at a projector's size.
        slides = browser.new_page(viewport=PROJECTOR, device_scale_factor=1.5)
        slides.set_default_timeout(120_000)
        slides.goto(f"{frame.url.split('#')[0]}?token={lab.token}")
        slides.wait_for_selector(".reveal .slides section.present", timeout=120_000)
        slides.wait_for_timeout(2000)  # let the outputs render
        visited = [slide_position(slides)]
        while True:
            slides.screenshot(path=ARTIFACTS / f"{path.stem}-slide-{len(visited):02d}.png")
            slides.keyboard.press("Space")
            slides.wait_for_timeout(600)  # the transition
            position = slide_position(slides)
            if position == visited[-1]:
                break  # the last step: space no longer moves
            visited.append(position)
            assert len(visited) <= 200, "the slideshow does not end"
        assert len(visited) == slideshow_steps(path), (len(visited), slideshow_steps(path), visited)
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"{path.stem}-slideshow-failure.png", full_page=True)
        raise
    finally:
        if slides is not None:
            slides.close()
        lab.shut_down(SLIDESHOW)
        page.close()
