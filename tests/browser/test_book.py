"""Real-browser test of the book (book/_build/html, built by `make book`): headless Debian Chromium via Playwright.

The built site is served by a local http.server on a free 127.0.0.1 port. Every page must load with no console
error and no failed request; every request must stay on that server (any other host is aborted and reported);
math must be typeset by the local MathJax (no raw TeX left, no MathJax error); each notebook page whose code
draws must show its figures, every one decoded; every link into the glossary and the references must land on an
element that exists. Negative controls at the end feed the same checks a page that breaks each rule.

Skips only when the book has not been built (`make book` first; .ci/run builds it). Screenshots go to
artifacts/browser/book_*.png. Run with `make test-browser`.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
# Another built copy of the site can be checked with HYBRIDLAB_BOOK_HTML=path/to/html.
SITE = Path(os.environ.get("HYBRIDLAB_BOOK_HTML", ROOT / "book" / "_build" / "html")).resolve()
ARTIFACTS = ROOT / "artifacts" / "browser"
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("0*.ipynb"))
PAGES = ["index", "glossary", "references", "api", "genindex", "search"] + [
    f"notebooks/{n}" for n in NOTEBOOKS
]
# Generous: a loaded CI machine may be slow. Never a pass condition.
WAIT_MS = 120_000

# Text of the page outside code, outputs and typeset math: where a raw `$...$` or `\(...\)` would be a bug.
_PROSE_TEXT_JS = """() => {
    const root = document.querySelector('main') || document.body;
    const clone = root.cloneNode(true);
    clone.querySelectorAll('pre, code, script, style, mjx-container, .cell_output, .highlight, textarea')
        .forEach(e => e.remove());
    return clone.textContent;
}"""
_RAW_MATH = re.compile(r"(?<![\\\w])\$[^$\s][^$\n]{0,200}?\$|\\\(|\\\[")

_MATH_STATE_JS = """() => ({
    math: document.querySelectorAll('span.math, div.math').length,
    untypeset: [...document.querySelectorAll('span.math, div.math')]
        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80)),
})"""

_FIGURES_JS = """() => [...document.querySelectorAll('.cell_output img, .output img')].map(img => ({
    src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0,
}))"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").exists():
        if os.environ.get(
            "CI"
        ):  # .ci/run builds the book before this test: a missing site there is a failure
            pytest.fail(f"{SITE} is missing although CI builds it (`make book`) before the browser tests")
        pytest.skip(f"{SITE} is not built: run `make book` first (.ci/run does)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright python package is not installed"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class _Watch:
    """Console errors, page errors, failed requests and every request to a host other than the local server."""

    def __init__(self, page, base: str):
        self.errors: list[str] = []
        self.outside: list[str] = []
        host = urlparse(base).netloc

        def route(r):
            url = r.request.url
            if urlparse(url).scheme in ("data", "blob") or urlparse(url).netloc == host:
                r.continue_()
            else:
                self.outside.append(url)
                r.abort()

        page.route("**/*", route)
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on(
            "requestfailed",
            lambda r: urlparse(r.url).netloc == host and self.errors.append(f"failed request: {r.url}"),
        )
        page.on(
            "response",
            # The browser asks for /favicon.ico on its own; no page of the site references one.
            lambda r: (
                r.status >= 400
                and not r.url.endswith("/favicon.ico")
                and self.errors.append(f"HTTP {r.status}: {r.url}")
            ),
        )


def _wait_for_math(page) -> None:
    """Wait until the local MathJax has typeset the page (pages without math load no MathJax)."""
    if not page.evaluate("() => document.querySelectorAll('span.math, div.math').length"):
        return
    page.wait_for_function(
        "() => window.MathJax && window.MathJax.startup && window.MathJax.startup.promise", timeout=WAIT_MS
    )
    page.evaluate("() => window.MathJax.startup.promise.then(() => true)")


def _math_problems(page) -> list[str]:
    state = page.evaluate(_MATH_STATE_JS)
    problems = [f"not typeset: {t!r}" for t in state["untypeset"][:5]]
    problems += [f"MathJax error: {t!r}" for t in state["errors"][:5]]
    raw = _RAW_MATH.findall(page.evaluate(_PROSE_TEXT_JS))
    problems += [f"raw TeX left in the text: {t!r}" for t in raw[:5]]
    return problems


def _open(browser, base: str, path: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    watch = _Watch(page, base)
    response = page.goto(urljoin(base, path), wait_until="load", timeout=WAIT_MS)
    assert response is not None and response.status == 200, f"{path}: HTTP {response and response.status}"
    _wait_for_math(page)
    return page, watch


def _makes_figures(stem: str) -> bool:
    """Whether the stored notebook's code draws: then its page must show at least one figure."""
    cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return bool(re.search(r"figures|matplotlib|plt\.|\.show\(", code))


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_cleanly_with_typeset_math(site, browser, path):
    page, watch = _open(browser, site, f"{path}.html")
    try:
        page.wait_for_timeout(300)  # late console errors (deferred scripts) still count
        problems = list(watch.errors) + [f"request left localhost: {u}" for u in watch.outside]
        problems += _math_problems(page)
        if path in ("index", "glossary", "notebooks/02_gradient_decomposition"):
            page.screenshot(path=str(ARTIFACTS / f"book_{Path(path).name}.png"), full_page=False)
    finally:
        page.close()
    assert not problems, f"{path}.html:\n" + "\n".join(problems)


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_page_shows_its_figures(site, browser, stem):
    page, watch = _open(browser, site, f"notebooks/{stem}.html")
    try:
        page.wait_for_load_state("networkidle", timeout=WAIT_MS)
        figures = page.evaluate(_FIGURES_JS)
        text = page.evaluate("() => document.querySelector('main').textContent")
    finally:
        page.close()
    broken = [f["src"] for f in figures if not f["ok"]]
    assert not broken, f"{stem}: figures that did not load: {broken}"
    if _makes_figures(stem):
        assert figures, f"{stem} draws figures, but its page shows none (were the outputs executed?)"
    assert "Traceback" not in text, f"{stem}: a traceback on the page"
    assert not watch.outside, f"{stem}: requests left localhost: {watch.outside}"


def _ids(page) -> set[str]:
    return set(page.evaluate("() => [...document.querySelectorAll('[id]')].map(e => e.id)"))


def _links(page, base: str) -> list[tuple[str, str]]:
    """(page path, fragment) of every link on the page into the book's glossary or references."""
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    found = []
    for href in hrefs:
        url, fragment = urldefrag(href)
        if not url.startswith(base):
            continue
        target = url[len(base) :]
        if target in ("glossary.html", "references.html"):
            found.append((target, fragment))
    return found


def test_glossary_and_reference_links_resolve(site, browser):
    targets: dict[str, set[str]] = {}
    for target in ("glossary.html", "references.html"):
        page, _ = _open(browser, site, target)
        targets[target] = _ids(page)
        page.close()
    links: list[tuple[str, str, str]] = []
    for path in PAGES:
        page, _ = _open(browser, site, f"{path}.html")
        links += [(path, target, fragment) for target, fragment in _links(page, site)]
        page.close()
    assert any(t == "glossary.html" and f for _, t, f in links), "no page links into the glossary"
    missing = [f"{p}.html -> {t}#{f}" for p, t, f in links if f and f not in targets[t]]
    assert not missing, "links to anchors that do not exist:\n" + "\n".join(sorted(set(missing)))
    # The anchors notebooks and other pages are told to use.
    for anchor in ("state", "k-t", "kl-t", "dense", "sparse", "future-kl", "pi-star", "k1", "k3", "baseline"):
        assert anchor in targets["glossary.html"], f"glossary.html#{anchor} is missing"


# --- negative controls: each check above must be able to fail ------------------------------------------------------


def test_checks_catch_raw_math_outside_requests_and_broken_images(site, browser):
    page = browser.new_page()
    watch = _Watch(page, site)
    try:
        page.goto(urljoin(site, "index.html"), wait_until="load", timeout=WAIT_MS)
        page.evaluate(
            """() => {
                const main = document.querySelector('main');
                main.insertAdjacentHTML('beforeend',
                    '<p>left raw: $x^2$ and \\\\(y\\\\)</p>' +
                    '<div class="cell_output"><img src="https://example.invalid/figure.png"></div>' +
                    '<div class="cell_output"><img src="_images/no-such-figure.png"></div>');
            }"""
        )
        page.wait_for_timeout(500)
        raw = _RAW_MATH.findall(page.evaluate(_PROSE_TEXT_JS))
        figures = page.evaluate(_FIGURES_JS)
    finally:
        page.close()
    assert "$x^2$" in raw and "\\(" in raw, raw
    assert "https://example.invalid/figure.png" in watch.outside, watch.outside
    assert any("no-such-figure.png" in e for e in watch.errors), watch.errors
    assert [f["ok"] for f in figures] == [False, False], figures


def test_checks_catch_untypeset_math_and_missing_anchors(site, browser):
    page = browser.new_page()
    try:
        page.goto(urljoin(site, "glossary.html"), wait_until="load", timeout=WAIT_MS)
        _wait_for_math(page)
        assert not _math_problems(page)
        page.evaluate(
            """() => document.querySelector('main').insertAdjacentHTML('beforeend',
                '<span class="math">\\\\(z\\\\)</span><a href="glossary.html#no-such-term">x</a>')"""
        )
        problems = _math_problems(page)
        links = _links(page, site)
        ids = _ids(page)
    finally:
        page.close()
    assert any(p.startswith("not typeset") for p in problems), problems
    assert ("glossary.html", "no-such-term") in links and "no-such-term" not in ids
