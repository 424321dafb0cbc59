"""The API reference, generated from ``__all__``: a MkDocs hook (``hooks:`` in ``mkdocs.yml``).

A page of ``docs/api/`` holds a line ``<!-- public-api cratevit.X -->``; this hook replaces it, before the Markdown
is converted, with one mkdocstrings entry (``::: path.to.Name``) per name of ``cratevit.X.__all__`` that the layer
defines, and a table linking the names it re-exports from a lower layer to the page that documents them. So the
reference follows ``__all__`` as it changes, and a public name appears on exactly one page. Names are resolved by
importing the package (several layers import their names lazily, which a static reader cannot follow).

``public_names()`` is what ``tests/test_docs_site.py`` checks: every public name has a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- public-api (?P<module>[\w.]+) -->$", re.M)

# The layers of the package, top to bottom (README "Architecture"); each has a page docs/api/<page>.md.
LAYERS = {
    "cratevit": "cratevit",
    "cratevit.cli": "cli",
    "cratevit.explore": "explore",
    "cratevit.train": "train",
    "cratevit.analysis": "analysis",
    "cratevit.interop": "interop",
    "cratevit.checkpoint": "checkpoint",
    "cratevit.data": "data",
    "cratevit.zoo": "zoo",
    "cratevit.presets": "presets",
    "cratevit.registry": "registry",
    "cratevit.models": "models",
    "cratevit.errors": "errors",
}


@dataclass(frozen=True)
class PublicName:
    """One name of a layer's ``__all__``: where it is exported and where it is defined."""

    layer: str  # "cratevit.models"
    name: str  # "CRATE"
    target: str  # the dotted path of its definition, "cratevit.models.crate.CRATE"

    @property
    def home(self) -> str:
        """The layer that defines the name (its page documents it)."""
        homes = [layer for layer in LAYERS if owns(layer, self.target)]
        if not homes:
            raise LookupError(f"{self.layer}.{self.name} is defined outside cratevit ({self.target})")
        return max(homes, key=len)


def owns(layer: str, target: str) -> bool:
    """Whether ``target`` (a dotted path) is defined inside ``layer``; the top-level package owns only itself."""
    if layer == "cratevit":
        return target.rsplit(".", 1)[0] in ("cratevit", "cratevit.version")
    return target == layer or target.startswith(layer + ".")


def _ensure_src_on_path() -> None:
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def definition(module_name: str, name: str) -> str:
    """The dotted path where ``module_name.name`` is defined: a class or function's own module, else the module
    whose source assigns the name at top level (constants have no ``__module__``)."""
    _ensure_src_on_path()
    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    candidates = [module_name, *sorted(m for m in sys.modules if m.startswith("cratevit."))]
    assignment = re.compile(rf"^{re.escape(name)}\s*[:=]", re.M)
    for candidate in candidates:
        mod = sys.modules.get(candidate)
        path = getattr(mod, "__file__", None)
        if path and vars(mod).get(name, None) is obj and assignment.search(Path(path).read_text()):
            return f"{candidate}.{name}"
    raise LookupError(f"cannot find where {module_name}.{name} is defined")


def public_names(layer: str) -> list[PublicName]:
    """Every name of ``layer.__all__``, resolved to its definition."""
    _ensure_src_on_path()
    module = importlib.import_module(layer)
    return [PublicName(layer, name, definition(layer, name)) for name in module.__all__]


def api_markdown(layer: str) -> str:
    """The reference of one layer: its module docstring, its own names, then its re-exports as links."""
    names = public_names(layer)
    own = [n for n in names if n.home == layer]
    reexported = [n for n in names if n.home != layer]
    lines = [f"::: {layer}", "    options:", "      members: false", "      show_root_heading: false", ""]
    for n in own:
        lines += [f"::: {n.target}", ""]
    if reexported:
        lines += ["## Re-exported here", "", "| name | defined in |", "|---|---|"]
        for n in reexported:
            page = LAYERS[n.home]
            lines.append(f"| [`{n.name}`][{n.target}] | [`{n.home}`]({page}.md) |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs calls it with these four arguments
    return MARKER.sub(lambda m: api_markdown(m.group("module")), markdown)
