"""cratevit: CRATE, the white-box Coding RAte reduction TransformEr, for training, loading and looking inside.

Layers, top to bottom; each imports only the layers below it (``tests/project/test_layers.py`` checks this)::

    cli
    train | analysis | interop
    checkpoint | data
    zoo
    presets
    registry
    models (torch only)
    errors, version

``import cratevit`` is instant: it imports neither torch nor timm nor huggingface_hub. Each public name below is
imported on first use (``cratevit.CRATE``, ``from cratevit import create_model``), which also attaches
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to the model classes. The presets are registered with
timm as soon as both are imported, in either order (``import cratevit, timm`` or ``import timm, cratevit``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these names are imported on first use
    from .checkpoint import create_model, load_checkpoint, load_model, save_checkpoint, save_safetensors
    from .errors import CheckpointError, UserError
    from .interop import register_timm_models
    from .models import CRATE, CRATEConfig, CRATETrace, LayerTrace, forward_flops
    from .presets import get_config, list_models

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("CRATE", "CRATEConfig", "CRATETrace", "LayerTrace", "forward_flops"), "cratevit.models"),
    **dict.fromkeys(
        ("create_model", "load_checkpoint", "load_model", "save_checkpoint", "save_safetensors"), "cratevit.checkpoint"
    ),
    **dict.fromkeys(("CheckpointError", "UserError"), "cratevit.errors"),
    **dict.fromkeys(("get_config", "list_models"), "cratevit.presets"),
    "register_timm_models": "cratevit.interop.timm_models",
}

__all__ = [
    "CRATE",
    "CRATEConfig",
    "CRATETrace",
    "CheckpointError",
    "LayerTrace",
    "UserError",
    "__version__",
    "create_model",
    "forward_flops",
    "get_config",
    "list_models",
    "load_checkpoint",
    "load_model",
    "register_timm_models",
    "save_checkpoint",
    "save_safetensors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cratevit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    importlib.import_module("cratevit.interop.hub")  # attaches the Hub methods to the model classes (light)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _register_with_timm() -> None:
    importlib.import_module("cratevit.interop.timm_models")  # registers every preset on import


def _attach_hub_methods() -> None:
    importlib.import_module("cratevit.interop.hub")  # attaches the Hub methods to every family's class (light)


def _attach_hub_methods_to_models() -> None:
    # ``from cratevit.models import CRATE`` alone: attach now. When the registry's import is what loaded the
    # models, it is still running: the registry's own hook attaches them once it has finished.
    if "cratevit.registry" not in sys.modules:
        _attach_hub_methods()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``action`` right after the module ``name`` finishes its own import. Two uses: the presets are
    registered with timm when timm loads (``import cratevit`` does not import timm, which takes seconds, and
    ``import cratevit, timm`` still finds the models); the Hub methods are attached when ``cratevit.models`` loads
    (``from cratevit.models import CRATE; CRATE.from_pretrained`` works although models/ may not import upward)."""

    def __init__(self, name: str, action: Any) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and let the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_act(module: Any) -> None:
            exec_module(module)
            self.action()

        spec.loader.exec_module = exec_then_act  # type: ignore[method-assign]
        return spec


def _after_import(name: str, action: Any) -> None:
    if name in sys.modules:
        action()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


_after_import("timm", _register_with_timm)
_after_import("cratevit.models", _attach_hub_methods_to_models)
_after_import("cratevit.registry", _attach_hub_methods)
