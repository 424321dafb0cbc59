"""Reading and writing weights: every released CRATE checkpoint family loads with one call.

* :mod:`.keys`: state dicts converted between a family's reference layout and ours, by the key table in its
  record (:data:`KEY_TABLES`, a read-only view of the registry); which family and layout a state dict has;
* :mod:`.read`: the only ``torch.load`` and safetensors read of cratevit; tells the file kinds apart;
  :func:`peek` answers what a file is (kind, family, layout, configurations) in one read;
* :mod:`.infer`: tensor shapes -> configuration (for files that do not record it): the family record's shape
  reader, then the presets (head counts the shapes cannot tell, the preset's name);
* :mod:`.write`: atomic writes of checkpoints, safetensors files and Hugging Face folders;
* :mod:`.load`: the one front door (:func:`load_model`: preset name, file or folder -> model), used by
  :func:`load_checkpoint`, :func:`create_model` (``checkpoint=``), analysis, segmentation, the engine and export.
"""

from ..errors import CheckpointError
from .infer import infer_config, read_config, resolve_config
from .keys import KEY_TABLES, from_reference_keys, is_reference_state, strip_prefix, to_reference_keys
from .load import (
    HEAD_KEYS,
    create_model,
    load_checkpoint,
    load_folder,
    load_into,
    load_model,
    load_state_dict_strict,
    non_finite_keys,
    pretrained_cfg_from_meta,
    warn_non_finite,
)
from .read import (
    FAMILIES,
    FILE_KINDS,
    FORMAT,
    Peek,
    check_hub_config,
    load_file,
    peek,
    read_checkpoint,
    read_folder,
    stored_preprocessing,
)
from .write import atomic_path, atomic_save, checkpoint_dict, hub_config, save_checkpoint, save_folder, save_safetensors

__all__ = [
    "FAMILIES",
    "FILE_KINDS",
    "FORMAT",
    "HEAD_KEYS",
    "KEY_TABLES",
    "CheckpointError",
    "Peek",
    "atomic_path",
    "atomic_save",
    "check_hub_config",
    "checkpoint_dict",
    "create_model",
    "from_reference_keys",
    "hub_config",
    "infer_config",
    "is_reference_state",
    "load_checkpoint",
    "load_file",
    "load_folder",
    "load_into",
    "load_model",
    "load_state_dict_strict",
    "non_finite_keys",
    "peek",
    "pretrained_cfg_from_meta",
    "read_checkpoint",
    "read_config",
    "read_folder",
    "resolve_config",
    "save_checkpoint",
    "save_folder",
    "save_safetensors",
    "stored_preprocessing",
    "strip_prefix",
    "to_reference_keys",
    "warn_non_finite",
]
