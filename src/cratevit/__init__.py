"""cratevit: CRATE, the white-box Coding RAte reduction TransformEr, for training, loading and looking inside.

Layers, top to bottom; each imports only the layers below it (``tests/test_layers.py`` checks this)::

    cli
    train | analysis | interop
    checkpoint | data
    zoo
    presets
    registry
    models (torch only)
    errors, version
"""

from .checkpoint import CheckpointError, create_model, load_checkpoint, load_model, save_checkpoint, save_safetensors
from .errors import UserError
from .interop import register_timm_models  # importing cratevit registers the presets with timm, attaches Hub methods
from .models import CRATE, CRATEConfig, CRATETrace, LayerTrace, forward_flops
from .presets import get_config, list_models
from .version import __version__

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
