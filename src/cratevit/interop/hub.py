"""Hugging Face Hub: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as functions, attached to CRATE.

The model classes in :mod:`cratevit.models` import torch alone; huggingface_hub is not a base class of them (so
its ``PyTorchModelHubMixin.__new__`` does not run on every ``CRATE(...)``). Instead:

* :func:`save_pretrained` writes ``model.safetensors`` (the weights, with the configuration in the file's
  metadata) and ``config.json`` in timm's layout (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``) plus ``"model_type": "crate"``, and a model card; the folder loads with
  ``CRATE.from_pretrained(dir)``, ``cratevit.checkpoint.load_model(dir)``, ``timm.create_model("local-dir:DIR")``
  and, once pushed, ``timm.create_model("hf-hub:USER/REPO")``;
* :func:`from_pretrained` reads such a folder, or downloads it from the Hub (when the network allows), and
  loads the weights strictly (:func:`cratevit.checkpoint.load_folder`);
* :func:`push_to_hub` uploads the folder.

huggingface_hub's mixin still does the Hub work (model card, download, upload), through a small adapter object
that holds the model. :func:`attach_hub_methods` adds the three as methods of every registered family's model
class when :mod:`cratevit` is imported, so ``model.save_pretrained(dir)`` and ``CRATE.from_pretrained(id)`` work
as before. huggingface_hub is imported on first use only.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from ..registry import families, family_for, get_family

__all__ = ["attach_hub_methods", "from_pretrained", "push_to_hub", "save_pretrained"]


@cache
def _adapter_class(family: str = "crate") -> type:
    """huggingface_hub's mixin around a model held by composition (built on first use, one per family: the Hub
    metadata comes from the family's card)."""
    from huggingface_hub import PyTorchModelHubMixin

    card = get_family(family).card

    class HubAdapter(
        PyTorchModelHubMixin,
        library_name="cratevit",
        license=card.license if card else None,
        pipeline_tag=card.pipeline_tag if card else None,
        paper_url=card.paper_url if card else None,
        repo_url=get_family(family).paper.get("origin_url"),
        tags=list(card.tags) if card else None,
    ):
        def __init__(self, model: nn.Module | None = None) -> None:
            self.model = model

        def _save_pretrained(self, save_directory: Path) -> None:
            from ..checkpoint import save_folder

            save_folder(self.model, save_directory)

        @classmethod
        def _from_pretrained(
            cls,
            *,
            model_id: str,
            revision: str | None,
            cache_dir: str | Path | None,
            force_download: bool,
            local_files_only: bool,
            token: str | bool | None,
            config: dict[str, Any] | None = None,
            map_location: str = "cpu",
            **model_kwargs: Any,
        ) -> Any:
            from ..checkpoint.read import CONFIG_NAME

            if not isinstance(config, dict):
                raise FileNotFoundError(
                    f"{model_id} has no readable {CONFIG_NAME}; it was not written by save_pretrained"
                )
            # The mixin also passes every config.json entry as a keyword; only values that differ are user overrides.
            model_kwargs.pop("strict", None)  # PyTorchModelHubMixin's option; loading here is always strict
            overrides = {k: v for k, v in model_kwargs.items() if not (k in config and config[k] == v)}
            weights = _weights_file(model_id, revision, cache_dir, force_download, local_files_only, token)
            from ..checkpoint import load_folder

            model = load_folder(model_id, config=config, weights=weights, **overrides)
            return model.to(map_location).eval()

    return HubAdapter


def _weights_file(
    model_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    force_download: bool,
    local_files_only: bool,
    token: str | bool | None,
) -> Path:
    from ..checkpoint.read import CONFIG_NAME, WEIGHTS_NAME

    if os.path.isdir(model_id):
        path = Path(model_id) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{model_id} has {CONFIG_NAME} but no {WEIGHTS_NAME}; save the model again")
        return path
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id=model_id,
            filename=WEIGHTS_NAME,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
    )


def save_pretrained(model: nn.Module, save_directory: str | Path, **kwargs: Any) -> Any:
    """Write ``config.json``, ``model.safetensors`` and a model card into ``save_directory`` (huggingface_hub's
    ``save_pretrained`` options, e.g. ``push_to_hub=True, repo_id=...``, are accepted)."""
    return _adapter_class(family_for(model).name)(model).save_pretrained(save_directory, **kwargs)


def push_to_hub(model: nn.Module, repo_id: str, **kwargs: Any) -> Any:
    """Upload the model as a ``save_pretrained`` folder to the Hub repository ``repo_id``."""
    return _adapter_class(family_for(model).name)(model).push_to_hub(repo_id, **kwargs)


def from_pretrained(pretrained_model_name_or_path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a folder written by ``save_pretrained`` or a Hub repository id (``user/repo``).

    Keyword arguments that name configuration fields override the stored configuration (``num_classes=``
    re-initialises the classifier; ``dynamic_img_size=True`` allows other input sizes); huggingface_hub's
    download options (``revision=``, ``cache_dir=``, ``local_files_only=`` ...) are passed on.
    """
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    hub_errors = (
        EntryNotFoundError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from ..checkpoint.read import CONFIG_NAME  # on use: this module loads while cratevit.models does (no cycle)

    source = str(pretrained_model_name_or_path)
    # A Hub id is "user/repo". Anything else (no slash, an absolute or relative path, more than one slash, or a
    # first part that is a local folder) is a local path: a mistyped one fails here at once instead of going to
    # the Hub and retrying.
    looks_local = (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") != 1
        or os.path.isdir(source.split("/")[0])
    )
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, CONFIG_NAME)):
            raise FileNotFoundError(
                f"{source} has no {CONFIG_NAME}; pass a folder written by CRATE.save_pretrained or "
                f"`cratevit export --format hf` (training checkpoints load with cratevit.load_checkpoint)"
            )
    elif os.path.exists(source):
        raise FileNotFoundError(
            f"{source} is not a folder; pass a folder written by CRATE.save_pretrained or a Hub id 'user/repo' "
            f"(single checkpoint files load with cratevit.load_checkpoint)"
        )
    elif looks_local:
        raise FileNotFoundError(
            f"{source} is not a folder here (nor a Hub id of the form 'user/repo'); check the path, or pass a "
            f"folder written by CRATE.save_pretrained"
        )
    try:
        return _adapter_class().from_pretrained(pretrained_model_name_or_path, **kwargs)
    except hub_errors as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(
            f"cannot fetch {source!r} from the Hugging Face Hub ({type(e).__name__}: {first[:160]}); check the "
            f"repo id and the network, or pass a local folder written by save_pretrained"
        ) from None


def _save_pretrained_method(self: nn.Module, save_directory: str | Path, **kwargs: Any) -> Any:
    return save_pretrained(self, save_directory, **kwargs)


def _push_to_hub_method(self: nn.Module, repo_id: str, **kwargs: Any) -> Any:
    return push_to_hub(self, repo_id, **kwargs)


def _from_pretrained_method(cls: type, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> nn.Module:
    model = from_pretrained(pretrained_model_name_or_path, **kwargs)
    if not isinstance(model, cls):
        raise TypeError(f"{pretrained_model_name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
    return model


_save_pretrained_method.__doc__ = save_pretrained.__doc__
_push_to_hub_method.__doc__ = push_to_hub.__doc__
_from_pretrained_method.__doc__ = from_pretrained.__doc__


def attach_hub_methods() -> None:
    """Give every registered family's model class ``save_pretrained``, ``push_to_hub`` and the class method
    ``from_pretrained`` (idempotent; :mod:`cratevit` calls it on import)."""
    for family in families().values():
        cls = family.model_cls
        cls.save_pretrained = _save_pretrained_method
        cls.push_to_hub = _push_to_hub_method
        cls.from_pretrained = classmethod(_from_pretrained_method)


attach_hub_methods()
