"""The package's imports run one way, down the layers, with no circle (read from the source with ast).

Every ``import`` counts, including those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top. A module may import its own room and the rooms of lower layers; rooms of one layer do not import
# each other. "__init__" is the package facade (cratevit/__init__.py), "__main__" is ``python -m cratevit``.
LAYERS: list[set[str]] = [
    {"errors", "version"},
    {"models"},
    {"registry"},
    {"presets"},
    {"zoo"},
    {"checkpoint", "data"},
    {"interop", "train", "analysis"},
    {"explore"},  # the explore page's server (a user interface over analysis, like the CLI)
    {"cli"},
    {"__init__", "__main__"},
]
# What models/ may import besides the standard library: torch, and the leaf module of error classes.
MODELS_MAY_IMPORT = {"torch", "cratevit.errors"}


@dataclass
class ImportGraph:
    package: str
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> internal modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> external top-level names it imports

    def room(self, module: str) -> str:
        """``cratevit.checkpoint.read`` -> ``checkpoint``; the package's own ``__init__`` -> ``__init__``."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    def room_arrows(self) -> set[tuple[str, str]]:
        return {
            (self.room(a), self.room(b))
            for a, targets in self.edges.items()
            for b in targets
            if self.room(a) != self.room(b)
        }


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build_graph(src: Path, package: str) -> ImportGraph:
    """Every module of ``src/package`` and the modules each imports (at any depth of the file)."""
    graph = ImportGraph(package)
    for path in sorted((src / package).rglob("*.py")):
        graph.modules[_module_name(path, src)] = path
    for name, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        internal, external = set(), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one
                subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in graph.modules]
                targets = subs or [target]
                if subs and len(subs) < len(node.names):
                    targets.append(target)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    while target not in graph.modules:  # ``import a.b.C``-style names: the longest module prefix
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        internal.add(target)
                else:
                    external.add(target)
        graph.edges[name] = internal
        graph.external[name] = external
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


def layer_of(room: str, layers: list[set[str]]) -> int:
    for rank, rooms in enumerate(layers):
        if room in rooms:
            return rank
    raise KeyError(room)


def forbidden_imports(graph: ImportGraph, layers: list[set[str]]) -> list[str]:
    """Imports from a room to a room of the same or a higher layer, as ``a -> b (room -> room)``."""
    bad = []
    for a, targets in sorted(graph.edges.items()):
        for b in sorted(targets):
            ra, rb = graph.room(a), graph.room(b)
            if ra != rb and layer_of(rb, layers) >= layer_of(ra, layers):
                bad.append(f"{a} -> {b} ({ra} -> {rb})")
    return bad


def foreign_model_imports(graph: ImportGraph, room: str = "models") -> list[str]:
    """Imports of the ``models`` room other than the standard library, torch and cratevit.errors."""
    bad = []
    for module in sorted(m for m in graph.modules if graph.room(m) == room):
        for name in sorted(graph.external[module]):
            if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] not in MODELS_MAY_IMPORT:
                bad.append(f"{module} imports {name}")
        for name in sorted(graph.edges[module]):
            if graph.room(name) != room and name not in MODELS_MAY_IMPORT:
                bad.append(f"{module} imports {name}")
    return bad


# Modules that still import a model file, waiting for their owner's change (none: ToST is a family record, and the
# key tables and shape readers are in the records).
MODEL_FILE_IMPORTS_PENDING: set[str] = set()


def model_file_imports(graph: ImportGraph) -> list[str]:
    """Imports of a model file (``cratevit.models.<file>``) from outside ``models/`` and the registry: everything
    else asks the registry about a family (the package ``cratevit.models`` itself is its public face)."""
    bad = []
    for module in sorted(graph.edges):
        if graph.room(module) in ("models", "registry"):
            continue
        for target in sorted(graph.edges[module]):
            if graph.room(target) == "models" and target != f"{graph.package}.models":
                bad.append(f"{module} imports {target}")
    return bad


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph(SRC, "cratevit")


def test_every_room_has_a_layer(graph):
    rooms = {graph.room(m) for m in graph.modules}
    unknown = sorted(r for r in rooms if not any(r in layer for layer in LAYERS))
    assert not unknown, f"rooms without a layer (add them to LAYERS): {unknown}"


def test_the_walker_sees_imports_inside_functions(graph):
    # cratevit.cli.info imports the loader inside run(), the engine imports checkpoint at the top
    assert "cratevit.checkpoint" in graph.edges["cratevit.cli.info"]
    assert "cratevit.checkpoint" in graph.edges["cratevit.train.engine"]
    assert "huggingface_hub" in graph.external["cratevit.interop.hub"]  # imported on first use only


def test_no_import_circle(graph):
    assert find_cycles(graph.edges) == []


def test_imports_run_down_the_layers(graph):
    assert forbidden_imports(graph, LAYERS) == []


def test_models_import_torch_alone(graph):
    assert foreign_model_imports(graph) == []


def test_only_the_registry_imports_a_model_file(graph):
    bad = [line for line in model_file_imports(graph) if line.split()[0] not in MODEL_FILE_IMPORTS_PENDING]
    assert bad == []


def test_the_checker_finds_a_model_file_import(tmp_path):
    src = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": "",
            "models/crate.py": "",
            "registry.py": "from .models import crate\nfrom .models.crate import C\n",
            "presets.py": "from .models import C\n",
            "analysis/seg.py": "def f():\n    from ..models.crate import C  # a side door\n",
        },
    )
    assert model_file_imports(build_graph(src, "fake")) == ["fake.analysis.seg imports fake.models.crate"]


def test_engine_does_not_import_the_cli(graph):
    assert not {m for m in graph.edges["cratevit.train.engine"] if graph.room(m) == "cli"}


def test_only_checkpoint_read_calls_torch_load(graph):
    callers = []
    for module, path in graph.modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", None) == "torch":
                callers.append(module)
    assert sorted(set(callers)) == ["cratevit.checkpoint.read"]


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "fake" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_circle_an_upward_import_and_a_foreign_model_import(tmp_path):
    src = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": "import numpy\nfrom ..errors import E\n",
            "errors.py": "class E(Exception):\n    pass\n",
            "presets.py": "from .models import x\n",
            "checkpoint/__init__.py": "from .read import r\n",
            "checkpoint/read.py": "def r():\n    from ..cli import main  # upward, inside a function\n",
            "cli/__init__.py": "from ..checkpoint import read\n",
            "a.py": "from . import b\n",
            "b.py": "import fake.a\n",
        },
    )
    fake = build_graph(src, "fake")
    assert find_cycles(fake.edges) == [["fake.a", "fake.b"], ["fake.checkpoint.read", "fake.cli"]]
    layers = [{"errors"}, {"models"}, {"presets"}, {"checkpoint"}, {"cli", "__init__", "a", "b"}]
    assert forbidden_imports(fake, layers) == [
        "fake.a -> fake.b (a -> b)",
        "fake.b -> fake.a (b -> a)",
        "fake.checkpoint.read -> fake.cli (checkpoint -> cli)",
    ]
    assert foreign_model_imports(fake) == ["fake.models imports numpy", "fake.models imports fake.errors"]
