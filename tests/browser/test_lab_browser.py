"""Real-browser test of the mixing-weights lab: JupyterLab + headless Debian Chromium through Playwright.

Starts JupyterLab on a free localhost port (a random token; the notebook is served from a temporary copy so that
JupyterLab's autosave can never write outputs into the repository), opens notebook 05, runs all cells (smoke mode),
waits for the lab's widget, moves the λ slider with the keyboard, clicks Run, and checks that the figure on the page
changed. Screenshots go to artifacts/browser/. Run with `make test-browser`.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from tests._net import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "05_mixing_lab.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
# Generous waits: a loaded CI machine may be slow. Latency is printed and written to artifacts/, never asserted.
WAIT_S = 300
LAPTOP_WIDTH = 1280  # px: the dashboard must stay readable at this window width (file browser open)


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(
        f"jupyter lab did not answer {url} within {timeout} s; log:\n{log.read_text()[-3000:]}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (its own process group)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _changed_fraction(png_a: bytes, png_b: bytes) -> float:
    """Fraction of pixels that differ between two screenshots (0 when identical)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png_a)).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(png_b)).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).sum(-1) > 30).mean())


def test_slider_and_run_redraw_the_figure(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright python package is not installed"
    )
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.skip(f"{jupyter} not found: JupyterLab must be installed in the test environment")

    start = time.monotonic()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "failure_page.png").unlink(missing_ok=True)  # only a failing run leaves one
    serve = tmp_path / "notebooks"
    serve.mkdir()
    shutil.copy(NOTEBOOK, serve / NOTEBOOK.name)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel gets Jupyter's default (inline) backend
    env.update(
        HYBRIDLAB_SMOKE="1",
        PATH=f"{jupyter.parent}{os.pathsep}{env.get('PATH', '')}",
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
    )
    # Fresh user settings: start the notebook's kernel without a "Select Kernel" dialog, and no news toast.
    settings = {
        "notebook-extension/tracker": '{"autoStartDefaultKernel": true}',
        "apputils-extension/notification": '{"fetchNews": "false"}',
    }
    for name, text in settings.items():
        path = tmp_path / "lab-settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log = ARTIFACTS / "jupyter.log"
    with open(log, "w") as log_file:
        command = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
        command += [
            f"--IdentityProvider.token={token}",
            f"--notebook-dir={serve}",
            "--ServerApp.port_retries=0",
        ]
        if os.geteuid() == 0:  # CI containers run as root
            command.append("--allow-root")
        server = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=serve,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    browser = None
    try:
        _wait_for_server(f"{base}/api/status?token={token}", server, log, timeout=WAIT_S)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": LAPTOP_WIDTH, "height": 900})  # a laptop screen
            try:
                _drive_lab(page, f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", start)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "failure_page.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        _stop(server)
    elapsed = time.monotonic() - start
    print(f"browser test took {elapsed:.1f} s")


def _wait_or_fail(page, predicate: str, arg, timeout_ms: float, message: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function(predicate, arg=arg, timeout=timeout_ms)
    except PlaywrightTimeoutError:
        pytest.fail(message)


def _drive_lab(page, url: str, start: float) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    def left(
        _typical_s: float,
    ) -> float:  # ms for one wait: typically `_typical_s`, but never a pass condition
        return 1000 * WAIT_S

    # Should JupyterLab still ask which kernel to use (kernel specs loading slowly), accept its preselected default.
    select_kernel = page.locator(".jp-Dialog", has_text="Select Kernel")
    page.add_locator_handler(select_kernel, lambda dialog: dialog.locator("button.jp-mod-accept").click())
    page.goto(url, wait_until="domcontentloaded", timeout=left(60))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=left(60))
    # Cells run before the kernel is connected are dropped: wait for the status bar to show it idle.
    kernel_idle = r"() => /\| Idle/.test(document.querySelector('#jp-main-statusbar')?.textContent || '')"
    page.wait_for_function(kernel_idle, timeout=left(60))
    started = r"() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => /\[(\*|\d+)\]/.test(p.textContent))"
    for attempt in range(2):
        # Run > Run All Cells (the menu, as a person would).
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(started, timeout=15_000 if attempt == 0 else left(60))
            break
        except PlaywrightTimeoutError:
            if attempt:
                raise
            print("Run All Cells did not start the kernel within 15 s: trying once more")
    lab = page.locator(".hybridlab-mixing-lab")
    lab.wait_for(state="visible", timeout=left(90))
    figure = lab.locator("img.hybridlab-figure")
    figure.wait_for(state="visible", timeout=left(30))
    status = lab.locator(".hybridlab-status")
    page.wait_for_function(  # the notebook's last cell ran 100 steps before displaying the widget
        "el => el.textContent.includes('step 100')", arg=status.element_handle(), timeout=left(30)
    )
    figure.scroll_into_view_if_needed()
    _assert_readable_at_laptop_width(page, lab, figure)
    # Opened, the Recipe accordion's three columns of controls must fit the notebook as well.
    lab.locator(".hybridlab-recipe .jupyter-widget-Collapse-header").first.click()
    lab.locator(".hybridlab-teacher_trust").wait_for(state="visible", timeout=left(10))
    _assert_readable_at_laptop_width(page, lab, figure)
    before = figure.screenshot(path=str(ARTIFACTS / "lab_before.png"))
    src_before = figure.get_attribute("src")

    # Move the λ slider with the keyboard: Home sends it to its minimum (λ = 0: pure imitation).
    lam = lab.locator(".hybridlab-lam")
    handle = lam.locator(".noUi-handle")
    handle.focus()
    handle.press("Home")
    readout = lam.locator(".widget-readout")
    page.wait_for_function(
        "el => el.textContent.trim() === '0.00'", arg=readout.element_handle(), timeout=left(10)
    )

    clicked = time.monotonic()
    lab.locator("button.hybridlab-run").click()
    _wait_or_fail(
        page, "([el, old]) => el.getAttribute('src') !== old", [figure.element_handle(), src_before], left(20),
        f"the figure was not redrawn within {WAIT_S} s of clicking Run",
    )  # fmt: skip
    first_redraw = time.monotonic() - clicked
    _wait_or_fail(
        page, "el => el.textContent.includes('step 200')", status.element_handle(), left(30),
        f"the run of 100 more steps did not finish within {WAIT_S} s",
    )  # fmt: skip
    done = time.monotonic() - clicked
    assert "λ 0.00" in status.text_content(), f"the kernel did not get λ = 0: {status.text_content()!r}"
    page.wait_for_timeout(300)  # let the last image decode before the screenshot
    after = figure.screenshot(path=str(ARTIFACTS / "lab_after.png"))
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=False)
    (ARTIFACTS / "latency.txt").write_text(
        f"slider moved, Run clicked -> first redraw on the page: {first_redraw:.2f} s; "
        f"100 steps done and drawn: {done:.2f} s\n"
    )
    print(f"Run click -> first redraw {first_redraw:.2f} s, run finished and drawn {done:.2f} s")

    changed = _changed_fraction(before, after)
    assert changed > 0.02, (
        f"the figure barely changed after moving λ and clicking Run ({changed:.1%} of pixels)"
    )


def _assert_readable_at_laptop_width(page, lab, figure) -> None:
    """The dashboard as the browser draws it: its smallest label (FONT pt at the figure's dpi, scaled by the
    shown/natural width of the image) is >= 9 px, and the lab's controls fit the notebook without a scrollbar."""
    from hybridlab.lab.mixing_lab import _Dashboard

    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=figure.element_handle())
    shown, natural = figure.evaluate("img => [img.getBoundingClientRect().width, img.naturalWidth]")
    smallest_px = _Dashboard.FONT * _Dashboard.DPI / 72 * shown / natural
    scroll, client = lab.evaluate("el => [el.scrollWidth, el.clientWidth]")
    (ARTIFACTS / "laptop_width.txt").write_text(
        f"window {LAPTOP_WIDTH} px: figure shown {shown:.0f} of {natural} px, smallest label {smallest_px:.1f} px; "
        f"lab {scroll} px of content in {client} px\n"
    )
    print(f"figure shown at {shown:.0f}/{natural} px: smallest label {smallest_px:.1f} px")
    assert smallest_px >= 9, f"labels render at {smallest_px:.1f} px (< 9) at {LAPTOP_WIDTH} px window width"
    wide = lab.evaluate(
        """el => { const right = el.getBoundingClientRect().right;
                   return [...el.querySelectorAll('*')].filter(c => c.getBoundingClientRect().right > right + 1)
                       .slice(0, 5).map(c => c.className + ' ' + Math.round(c.getBoundingClientRect().right - right)); }"""
    )
    assert scroll <= client + 1, f"the lab overflows: {scroll} px of content in {client} px: {wide}"
