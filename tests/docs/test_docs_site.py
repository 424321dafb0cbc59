"""The documentation site builds offline with warnings as errors, every public name has a docstring, and the
README stays a short front page whose links all lead somewhere."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import griffe
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _hook():
    """scripts/mkdocs_api.py, the hook that expands the API pages (imported by path: scripts/ is no package)."""
    if "mkdocs_api" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mkdocs_api", ROOT / "scripts" / "mkdocs_api.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["mkdocs_api"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["mkdocs_api"]


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")},
    )


@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    site = tmp_path / "site"
    quickstart = (site / "quickstart" / "index.html").read_text()
    assert 'id="load-a-released-checkpoint"' in quickstart and 'id="look-at-attention"' in quickstart
    models = (site / "api" / "models" / "index.html").read_text()  # the reference is generated from __all__
    assert 'id="cratevit.models.crate.CRATE"' in models and "forward_trace" in models
    reference = "".join(page.read_text() for page in (site / "api").rglob("*.html"))
    assert ":class:" not in reference and ":func:" not in reference  # Sphinx roles render as code
    assert (site / "explore" / "page.png").is_file() and (site / "mae" / "reconstruction-shapes.png").is_file()


def test_the_build_is_strict(tmp_path: Path) -> None:
    """The configuration fails on a broken link and on a page left out of the navigation."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert config["validation"]["nav"]["omitted_files"] == "warn"
    assert config["validation"]["links"]["not_found"] == "warn"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [a page that is not there](missing.md).\n")
    (docs / "orphan.md").write_text("# Not in the navigation\n")
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}], hooks=[], plugins=["search"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stderr and "orphan.md" in result.stderr


def _docstring(package: griffe.Module, target: str) -> str:
    obj = package if target == "cratevit" else package[target.removeprefix("cratevit.")]
    return (obj.docstring.value if obj.docstring else "").strip()


@pytest.fixture(scope="module")
def static_package() -> griffe.Module:
    """The package as mkdocstrings reads it (statically, with griffe)."""
    return griffe.load("cratevit", search_paths=[str(ROOT / "src")], resolve_aliases=False)


# Public names of the layers' modules that had no docstring when this test was written. The list may only shrink:
# a new public name without a docstring fails, and so does a name of this list once it has one (remove it here).
DOCSTRING_DEBT: set[str] = set()


def _documented_names(layer: str):
    """Every name the layer's API page documents: its ``__all__``'s own names and its modules' names."""
    hook = _hook()
    own = [n for n in hook.public_names(layer) if n.home == layer]
    return own + [n for names in hook.module_names(layer).values() for n in names]


@pytest.mark.parametrize("layer", list(_hook().LAYERS))
def test_every_public_name_has_a_docstring(layer: str, static_package: griffe.Module) -> None:
    """Each name of a layer's ``__all__``, and of the ``__all__`` of its modules (resolved to where it is defined,
    constants included), has a docstring, so the API reference shows it; so does the layer's module."""
    assert _hook().public_names(layer), f"{layer} has an empty __all__"
    names = {n.target for n in _documented_names(layer)}
    missing = {t for t in names if not _docstring(static_package, t)}
    debt = DOCSTRING_DEBT & names
    assert not missing - debt, f"public names without a docstring: {sorted(missing - debt)}"
    assert not debt - missing, f"now documented, remove from DOCSTRING_DEBT: {sorted(debt - missing)}"
    assert _docstring(static_package, layer), f"{layer} has no module docstring"


def test_every_layer_has_an_api_page() -> None:
    hook = _hook()
    for layer, page in hook.LAYERS.items():
        text = (ROOT / "docs" / "api" / f"{page}.md").read_text()
        assert f"<!-- public-api {layer} -->" in text, page


def test_every_public_name_is_on_exactly_one_page() -> None:
    """A re-exported name is documented where it is defined and only linked elsewhere; every name of a layer's
    ``__all__`` is documented on some page."""
    hook = _hook()
    documented = [n.target for layer in hook.LAYERS for n in _documented_names(layer)]
    assert len(documented) == len(set(documented))
    exported = {n.target for layer in hook.LAYERS for n in hook.public_names(layer)}
    assert exported <= set(documented)
    assert len(documented) >= 250
    assert set(DOCSTRING_DEBT) <= set(documented), "DOCSTRING_DEBT names a name that is gone: remove it"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs gives a heading as its id)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s-]+", "-", text).strip("-")


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert len(local) >= 15
    for target in local:
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.is_file(), f"README links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to {target}: no such heading"
    # the three tasks a newcomer comes for, one click each
    for anchor in ("train-on-your-own-images", "load-a-released-checkpoint", "look-at-attention"):
        assert f"docs/quickstart.md#{anchor}" in readme


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_python_snippets_compile() -> None:
    """Every Python block of the README and the docs is valid Python (names like ``images`` are the reader's)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    blocks = [(page, block) for page in pages for block in _python_blocks(page.read_text())]
    assert len(blocks) >= 8
    for page, block in blocks:
        compile(block, str(page), "exec")


def test_readme_python_snippet_runs() -> None:
    """The README's first Python block runs as written (CI also runs it from the installed wheel)."""
    [first, *_] = _python_blocks((ROOT / "README.md").read_text())
    namespace: dict = {}
    exec(compile(first, "README.md", "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (2, 10)
    assert tuple(namespace["attn"].shape) == (1, 6, 197, 197)


def test_every_readme_section_has_a_home_in_the_docs() -> None:
    """The topics the README once held in full (before it shrank) each live on a page of the site."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = set(re.findall(r"[\w/-]+\.md", str(nav)))
    moved = {
        "install.md": "CPU-only wheels",
        "training.md": "torchrun",
        "models.md": "forward_trace",
        "zoo.md": 'arch="auto"',
        "crate-alpha.md": "OvercompleteISTA",
        "interop.md": "save_pretrained",
        "analysis.md": "Attention maps and PCA",
        "explore.md": "intervene",
        "segmentation.md": "MaskCut",
        "mae.md": "cratevit probe",
        "architecture.md": "Adding an architecture family",
        "performance.md": "Where the time goes",
        "numbers.md": "readme_numbers.py",
    }
    for page, phrase in moved.items():
        assert page in pages, f"{page} is not in the navigation"
        assert phrase in (ROOT / "docs" / page).read_text(), f"{page} lost {phrase!r}"
