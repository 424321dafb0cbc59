"""cratevit: CRATE, the white-box Coding RAte reduction TransformEr, for training, loading and looking inside."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_safetensors
from .model import CRATE, CRATEConfig, CRATETrace, LayerTrace, forward_flops
from .presets import create_model, get_config, list_models
from .timm_models import register_timm_models  # importing cratevit registers the presets with timm

__version__ = "0.1.0"

__all__ = [
    "CRATE",
    "CRATEConfig",
    "CRATETrace",
    "CheckpointError",
    "LayerTrace",
    "__version__",
    "create_model",
    "forward_flops",
    "get_config",
    "list_models",
    "load_checkpoint",
    "register_timm_models",
    "save_checkpoint",
    "save_safetensors",
]
