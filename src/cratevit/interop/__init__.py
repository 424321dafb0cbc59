"""cratevit and the other libraries: timm registration (:mod:`.timm_models`), Hugging Face Hub save/load/push
(:mod:`.hub`) and export to safetensors, Hugging Face folders and ONNX (:mod:`.export`).

Importing this package registers every preset with timm and attaches ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` to the model classes; :mod:`cratevit` imports it.
"""

from .hub import attach_hub_methods, from_pretrained, push_to_hub, save_pretrained
from .timm_models import checkpoint_filter_fn, register_timm_models

__all__ = [
    "attach_hub_methods",
    "checkpoint_filter_fn",
    "from_pretrained",
    "push_to_hub",
    "register_timm_models",
    "save_pretrained",
]
