"""The documentation cannot rot: its code runs, its API page is complete, its site builds.

* Every ```python block of every page under ``docs/`` runs, in order, in one
  namespace per page (``docs/make_figures.py: run_page``). The pages check
  their numbers with ``assert`` against a value computed another way, so a
  wrong example fails here. Blocks fenced as ```text or ```bash do not run.
* ``docs/api.md`` documents every public name of ``hessfunc`` and
  ``hessfunc.forward``.
* ``mkdocs.yml`` lists every page, every figure a page shows exists, every
  committed figure is shown somewhere.
* ``mkdocs build --strict`` passes (skipped when the ``docs`` extra is not
  installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import hessfunc as hf

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"


def _load_make_figures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_make_figures", DOCS / "make_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_figures = _load_make_figures()
PAGES = sorted(DOCS.rglob("*.md"))
PAGES_WITH_CODE = [p for p in PAGES if make_figures.python_blocks(p.read_text(encoding="utf-8"))]


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


# ------------------------------------------------------------------ the code
def test_block_extraction() -> None:
    text = "\n".join([
        "# Title",                     # 1
        "```python",                   # 2
        "a = 1",                       # 3
        "```",                         # 4
        "```text",                     # 5
        "not = code",                  # 6
        "```",                         # 7
        "!!! note",                    # 8
        "    ```python",               # 9
        "    b = a + 1",               # 10
        "    ```",                     # 11
        "```bash",                     # 12
        "hessfunc demo",               # 13
        "```",                         # 14
    ])
    assert make_figures.python_blocks(text) == [(3, "a = 1\n"), (10, "b = a + 1\n")]


def test_failing_block_points_at_the_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Intro\n\n```python\nx = 1\nassert x == 2, 'wrong'\n```\n")
    with pytest.raises(AssertionError, match="wrong") as info:
        make_figures.run_page(page)
    frame = info.traceback[-1]
    assert Path(str(frame.path)) == page and frame.lineno + 1 == 5


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_page_id)
def test_page_code_runs(page: Path) -> None:
    dtype = torch.get_default_dtype()
    grad_mode = torch.is_grad_enabled()
    namespace = make_figures.run_page(page)
    assert namespace, page
    # a page must not leak global torch state into the rest of the suite
    assert torch.get_default_dtype() == dtype
    assert torch.is_grad_enabled() == grad_mode


def test_pages_check_their_numbers() -> None:
    """Every tutorial has code, and every page with code asserts something."""
    tutorials = sorted((DOCS / "tutorials").glob("*.md"))
    assert len(tutorials) >= 8
    for page in tutorials:
        assert page in PAGES_WITH_CODE, f"{_page_id(page)} has no ```python block"
    for page in PAGES_WITH_CODE:
        code = "\n".join(c for _, c in make_figures.python_blocks(page.read_text("utf-8")))
        assert re.search(r"\bassert\b|assert_close", code), (
            f"{_page_id(page)}: its code checks nothing; add asserts against a reference")


# ------------------------------------------------------------------- the API
def _resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_api_page_documents_every_public_name() -> None:
    directives = re.findall(r"^::: ([\w.]+)\s*$", (DOCS / "api.md").read_text("utf-8"), re.M)
    documented = [_resolve(d) for d in directives]

    def is_documented(obj: Any) -> bool:
        return any(obj is d for d in documented)

    import hessfunc.forward

    missing = [f"hessfunc.{n}" for n in hf.__all__
               if n != "__version__" and not is_documented(getattr(hf, n))]
    missing += [f"hessfunc.forward.{n}" for n in hessfunc.forward.__all__
                if not is_documented(getattr(hessfunc.forward, n))
                and not is_documented(hessfunc.forward)]
    assert not missing, f"docs/api.md lacks a `::: ...` entry for {missing}"


# ------------------------------------------------------------ site structure
def test_nav_lists_every_page() -> None:
    config = MKDOCS_YML.read_text("utf-8")
    nav = config[config.index("\nnav:"):]
    for page in PAGES:
        assert re.search(rf":\s*{re.escape(_page_id(page))}\s*$", nav, re.M), (
            f"{_page_id(page)} is not in the nav of mkdocs.yml")
    for ref in re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M):
        assert (DOCS / ref).is_file(), f"mkdocs.yml nav names {ref}, which does not exist"


def test_figures_exist_and_are_used() -> None:
    shown = set()
    for page in PAGES:
        for ref in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", page.read_text("utf-8")):
            target = (page.parent / ref).resolve()
            assert target.is_file(), f"{_page_id(page)} shows {ref}, which does not exist"
            shown.add(target)
    for png in sorted((DOCS / "figures").glob("*.png")):
        assert png.resolve() in shown, f"docs/figures/{png.name} is not shown on any page"
        assert png.stat().st_size < 150_000, f"docs/figures/{png.name} is too large"


def _docs_tools_missing() -> str | None:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return module
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


@pytest.mark.skipif(_docs_tools_missing() is not None,
                    reason="the docs tools (mkdocs, mkdocs-material, mkdocstrings[python]) are "
                           "not installed; pip install -e '.[docs]' to build the site")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert (tmp_path / "site" / "api" / "index.html").is_file()
