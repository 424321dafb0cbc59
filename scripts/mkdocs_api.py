"""The API reference, generated from ``__all__``: a MkDocs hook (``hooks:`` in ``mkdocs.yml``).

A page of ``docs/api/`` holds a line ``<!-- public-api cratevit.X -->``; this hook replaces it, before the Markdown
is converted, with one mkdocstrings entry (``::: path.to.Name``) per name of ``cratevit.X.__all__`` that the layer
defines, and a table linking the names it re-exports from a lower layer to the page that documents them. So the
reference follows ``__all__`` as it changes, and a public name appears on exactly one page. Names are resolved by
importing the package (several layers import their names lazily, which a static reader cannot follow).

``public_names()`` is what ``tests/docs/test_docs_site.py`` checks: every public name has a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
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
    """Every name of ``layer.__all__`` (of any module), resolved to its definition. Names that timm's
    ``register_model`` appends to a module's ``__all__`` at run time (its model entry points) are left out, and so
    are later aliases of a name already listed."""
    _ensure_src_on_path()
    module = importlib.import_module(layer)
    names, seen = [], set()
    for name in module.__all__:
        if not hasattr(module, name):
            continue
        target = definition(layer, name)
        if target not in seen:  # an alias (``CRATETrace = WhiteBoxTrace``) is documented under its first name
            seen.add(target)
            names.append(PublicName(layer, name, target))
    return names


def submodules(layer: str) -> list[str]:
    """The public modules inside a layer package that declare ``__all__`` (``cratevit.analysis.inspection``)."""
    _ensure_src_on_path()
    package = importlib.import_module(layer)
    found = []
    for info in pkgutil.iter_modules(getattr(package, "__path__", []), layer + "."):
        if info.name.rsplit(".", 1)[1].startswith("_") or info.name in LAYERS:  # a layer has its own page
            continue
        if hasattr(importlib.import_module(info.name), "__all__"):
            found.append(info.name)
            found += submodules(info.name) if info.ispkg else []
    return found


def module_names(layer: str) -> dict[str, list[PublicName]]:
    """For each public module of a layer: the names of its ``__all__`` it defines itself and that the layer's own
    ``__all__`` does not already show (each name is documented once, where it is defined)."""
    shown = {n.target for n in public_names(layer)}
    out = {}
    for module in submodules(layer):
        names = [n for n in public_names(module) if n.target.rsplit(".", 1)[0] == module and n.target not in shown]
        shown |= {n.target for n in names}
        if names:
            out[module] = names
    return out


def summary(module_name: str, name: str) -> str:
    """The first line of a class's or function's docstring, for a table cell (empty for other objects)."""
    obj = getattr(importlib.import_module(module_name), name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return ""
    first = " ".join((inspect.getdoc(obj) or "").strip().split("\n\n")[0].split())
    first = re.split(r"(?<=[.;:])\s", first, maxsplit=1)[0].rstrip(";:")  # its first sentence
    first = re.sub(r":\w+:`~?([\w.]+)`", r"`\1`", first).replace("``", "`")  # Sphinx roles, RST literals
    return first.replace("|", "\\|")


def api_markdown(layer: str) -> str:
    """The reference of one layer: its module docstring, its own names, its re-exports as links, then the
    public names of its modules."""
    names = public_names(layer)
    own = [n for n in names if n.home == layer]
    reexported = [n for n in names if n.home != layer]
    lines = [f"::: {layer}", "    options:", "      members: false", "      show_root_heading: false", ""]
    for n in own:
        lines += [f"::: {n.target}", ""]
    if reexported:
        lines += ["## Re-exported from lower layers", "", "| name | what it is | documented in |", "|---|---|---|"]
        for n in reexported:
            page = LAYERS[n.home]
            lines.append(f"| [`{n.name}`][{n.target}] | {summary(layer, n.name)} | [`{n.home}`]({page}.md) |")
        lines.append("")
    for module, names in module_names(layer).items():
        members = ", ".join(n.name for n in names)
        lines += [f"::: {module}", "    options:", "      show_root_heading: true", "      show_root_full_path: true"]
        lines += [f"      members: [{members}]", "      heading_level: 2", ""]
    return "\n".join(lines)


ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def plain_roles(html: str) -> str:
    """Sphinx roles in docstrings (``:class:`~cratevit.errors.UserError```) as code: ``UserError``."""
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)


def on_page_content(html: str, page, config, files) -> str:  # MkDocs calls it with these four arguments
    return plain_roles(html)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs calls it with these four arguments
    return MARKER.sub(lambda m: api_markdown(m.group("module")), markdown)
