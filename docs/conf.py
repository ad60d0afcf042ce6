"""Sphinx configuration of the torchbilevel documentation site.

Build (warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html
Pages are Markdown (MyST); the API reference is generated from the docstrings (autodoc).
A new page is one line in a toctree of docs/index.md.

Why Sphinx (furo + MyST) rather than MkDocs Material + mkdocstrings: autodoc with napoleon
reads the library's Google-style docstrings as they are; MyST's {include} with
start-after/end-before makes the README's quickstarts the site's quickstart page without a
copy (one source, tested once); and -W turns every broken cross-reference, page left out
of the toctree, or docstring that does not parse into a failure that CI sees.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "torchbilevel"
author = "torchbilevel developers"
copyright = "torchbilevel developers, MIT License"

extensions = [
    "myst_parser",               # Markdown pages
    "sphinx.ext.autodoc",        # API reference from the docstrings
    "sphinx.ext.napoleon",       # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.mathjax",        # formulas
]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3         # [text](page.md#a-heading) links resolve
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]   # guide pages start their numbering at ## under the title

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as :ivar: fields: autodoc's :members: documents NamedTuple fields
# already (two descriptions of one attribute are a warning, an error under -W)
napoleon_use_ivar = True

html_theme = "furo"
html_title = "torchbilevel"
html_static_path = []

# MathJax: served from the built site when the `docs` extra's sphinx-mathjax-offline is
# installed (its files live in a folder whose name is not importable, so it is located
# here rather than loaded as an extension); otherwise the CDN default of sphinx.ext.mathjax.
try:
    from importlib.metadata import distribution
    _files = distribution("sphinx-mathjax-offline").files or []
    _js = next(f for f in _files if str(f).endswith("static/mathjax/tex-chtml.js"))
    _mathjax_dir = os.path.dirname(str(_js.locate()))
    html_static_path.append(os.path.dirname(_mathjax_dir))   # .../static: copies mathjax/
    mathjax_path = "mathjax/tex-chtml.js"
except Exception:                                             # not installed: use the CDN
    pass


# A docstring that docutils cannot parse cleanly (an indented example straight after a
# paragraph, a field list without its blank line) is shown as plain text, as help() shows
# it, rather than failing the -W build or rendering half-parsed. Each such docstring is
# listed in the build log ("shown as plain text") so that it can be fixed at its source.
import io
import re

from docutils import nodes
from docutils.core import publish_doctree
from sphinx.util import logging as _logging

_log = _logging.getLogger("torchbilevel.docs")
_SPHINX_ONLY = ("Unknown interpreted text role", "Unknown directive type", "No role entry", "No directive entry")


def _plain_text_if_broken(app, what, name, obj, options, lines):
    if not lines:
        return
    settings = {"report_level": 5, "halt_level": 5, "warning_stream": io.StringIO()}
    # Sphinx's roles need a build environment: check the docstring with them as plain literals
    text = re.sub(r":[\w:.-]+:`([^`]*)`", r"``\1``", "\n".join(lines))
    text = re.sub(r"^(\s*)\.\. [\w:-]+::.*$", r"\1..", text, flags=re.M)    # directives: comments
    try:
        tree = publish_doctree(text, settings_overrides=settings)
    except Exception:                                          # a role or directive we did not neutralise
        return
    broken = [m for m in tree.findall(nodes.system_message)
              if m["level"] >= 2 and not m.astext().startswith(_SPHINX_ONLY)
              and not any(s in m.astext() for s in _SPHINX_ONLY)]
    if broken:
        _log.info(f"docstring of {name} shown as plain text: {broken[0].astext().splitlines()[0]}")
        lines[:] = ["::", ""] + ["    " + line for line in lines] + [""]


def setup(app):
    app.connect("autodoc-process-docstring", _plain_text_if_broken, priority=900)  # after napoleon
