"""Sphinx configuration of the hybridlab book: the nine notebooks, executed in full mode, as a static site.

Build it with `make book` (it installs what it needs and writes book/_build/html/). Why Sphinx + myst-nb +
sphinx-book-theme and not Jupyter Book 2 / mystmd or Quarto: see book/README.md. In short, everything here is on
PyPI and builds offline; mystmd downloads its site theme from a web service at build time, and both mystmd and
Quarto would bring a second toolchain for what Sphinx already does (autodoc of the docstrings included).

Executed offline and locally, with no CDN: MathJax 3 comes from npm (book/package.json, `npm ci`) and is copied
into the site's _static/ (see `_copy_mathjax`); the ipywidgets embed scripts that myst-nb would load from a CDN
are switched off (the mixing lab needs a live kernel anyway, so its page says how to run it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
sys.path.insert(0, str(ROOT))  # autodoc imports hybridlab from this checkout

# The book is the executed view of the notebooks in FULL mode: never let a smoke-mode shell leak into it (the
# cache could not tell smoke outputs from full ones).
os.environ.pop("HYBRIDLAB_SMOKE", None)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the README's times are measured with 1 torch thread
# Figures must reach the outputs: the kernel's own inline backend, never a non-interactive MPLBACKEND from the shell.
os.environ.pop("MPLBACKEND", None)
# The kernels import `experiments` (programs beside the package) from the repository root, as `make lab` lets them.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

project = "hybridlab"
author = "hybridlab contributors"
copyright = "2025, hybridlab contributors (Apache-2.0)"
release = "0.1.0"

extensions = [
    "myst_nb",  # MyST markdown + notebooks (it sets up myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

root_doc = "index"
# The notebooks are reached through book/notebooks, a symlink to ../notebooks: the pages live under notebooks/
# and, because the link is followed, each notebook executes in the real notebooks/ folder, as under nbval.
exclude_patterns = [
    "_build",
    "node_modules",
    "README.md",
    "**/.ipynb_checkpoints",
    "notebooks/README.md",
]

# --- MyST -----------------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3  # `page.md#some-heading` links work (GitHub-style slugs)
myst_dmath_double_inline = True

# --- Execution (myst-nb + jupyter-cache) --------------------------------------------------------------------------
# "cache": a notebook is re-executed only when its code cells change (jupyter-cache hashes them). Inputs the hash
# cannot see (the library, the shipped data and configs) are fingerprinted below: when they change, the cache is
# emptied and every notebook runs again.
nb_execution_mode = "cache"
nb_execution_cache_path = str(BOOK / "_build" / ".jupyter_cache")
nb_execution_in_temp = False  # run in notebooks/ itself: the same working directory as nbval and JupyterLab
nb_execution_timeout = 3600  # per cell; notebook 08 trains a 135M-parameter model on CPU
nb_execution_raise_on_error = True  # a failing notebook fails the build; it is never published half-run
nb_execution_show_tb = True
nb_execution_allow_errors = False
nb_merge_streams = True
# No ipywidgets embed scripts from a CDN; a widget output falls back to its text/plain form.
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]


def _inputs_fingerprint() -> str:
    """sha256 over everything outside the notebooks that their outputs depend on."""
    digest = hashlib.sha256()
    paths: list[Path] = []
    for folder, pattern in (("hybridlab", "*.py"), ("experiments", "*.py"), ("configs", "*"), ("data", "*")):
        paths += [p for p in (ROOT / folder).rglob(pattern) if p.is_file() and "__pycache__" not in p.parts]
    paths.append(ROOT / "pyproject.toml")
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _reset_cache_if_inputs_changed() -> None:
    cache = Path(nb_execution_cache_path)
    stamp = cache.parent / ".jupyter_cache.inputs"
    current = _inputs_fingerprint()
    if cache.exists() and (not stamp.exists() or stamp.read_text().strip() != current):
        print("book: the library, data or configs changed since the cached run: re-executing every notebook")
        shutil.rmtree(cache)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current + "\n")


_reset_cache_if_inputs_changed()

# --- API reference ----------------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# --- HTML -------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "hybridlab: hybrid imitation + RL for language models"
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_last_updated_fmt = None
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_show_sourcelink = False
# Light pages by default (the figures are drawn on white); without a default the theme logs a console error.
html_context = {"default_mode": "light"}
pygments_style = "sphinx"

# Math without a CDN: MathJax 3 from book/node_modules, copied into _static/mathjax by _copy_mathjax. The path is
# relative to _static, so every page (at any depth) finds it.
MATHJAX_SRC = BOOK / "node_modules" / "mathjax" / "es5"
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {
    "tex": {"tags": "ams"},
    "options": {"enableMenu": False},  # the context menu would fetch more components on demand
}


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    shutil.copytree(MATHJAX_SRC, Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def _check_mathjax(app) -> None:
    if app.builder.format == "html" and not (MATHJAX_SRC / "tex-chtml.js").exists():
        raise RuntimeError(
            f"{MATHJAX_SRC / 'tex-chtml.js'} is missing: run `npm ci` in book/ (`make book` does it) so that "
            "math renders without a CDN"
        )


# An ipywidgets output has no static form: its text fallback is a repr such as "HBox(children=(VBox(...". Show a
# note instead, saying where the controls work.
_WIDGET_REPR = re.compile(r"^(HBox|VBox|Box|GridBox|Tab|Accordion|Stack|AppLayout|TwoByTwoLayout)\(children=")


def _replace_widget_reprs(app, doctree) -> None:
    from docutils import nodes

    for block in list(doctree.findall(nodes.literal_block)):
        classes = set(block.get("classes", [])) | set(
            getattr(block.parent, "get", lambda *_: [])("classes", [])
        )
        if not {"output", "cell_output"} & classes:  # only notebook outputs, never the code cells
            continue
        if not _WIDGET_REPR.match(block.astext()):
            continue
        note = nodes.note()
        note += nodes.paragraph(
            text="Interactive controls are displayed here when the notebook runs in JupyterLab (`make lab` in the "
            "repository): they need a live Python kernel, which this static page does not have. The figures "
            "above were drawn by the same lab from Python."
        )
        block.replace_self(note)


def setup(app) -> None:
    app.connect("builder-inited", _check_mathjax)
    app.connect("doctree-read", _replace_widget_reprs)
    app.connect("build-finished", _copy_mathjax)
