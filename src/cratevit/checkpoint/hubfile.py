"""One file of a Hugging Face Hub repository, through huggingface_hub's download and cache.

The address is ``hf-hub:OWNER/REPO/PATH/IN/REPO`` (``hf-hub:UCSC-VLAA/CRATE-alpha/torch/crate_alpha_B16.pth``),
optionally pinned with ``@REVISION`` after the repository (``hf-hub:OWNER/REPO@v1.0/PATH``). ``hf-hub:OWNER/REPO``
alone names a ``save_pretrained`` folder instead (see :func:`is_hub_file`). Downloads go to huggingface_hub's
cache (``HF_HUB_CACHE``) and are reused; with ``HF_HUB_OFFLINE=1`` only the cache is read.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, UserError

__all__ = ["HUB_PREFIX", "hub_file", "is_hub_file", "parse_hub_file"]

HUB_PREFIX = "hf-hub:"
"""The prefix of a Hub file address, ``hf-hub:OWNER/REPO[@REVISION]/PATH``."""


def is_hub_file(spec: object) -> bool:
    """An ``hf-hub:`` address with a file path after the repository."""
    spec = str(spec) if isinstance(spec, Path) else spec  # Path("hf-hub:a/b/c") keeps the address
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX) and spec[len(HUB_PREFIX) :].count("/") >= 2


def parse_hub_file(spec: str) -> tuple[str, str, str | None]:
    """``hf-hub:OWNER/REPO[@REV]/PATH`` -> (repo_id, filename, revision)."""
    owner, repo, *path = spec.removeprefix(HUB_PREFIX).split("/")
    repo, _, revision = repo.partition("@")
    if not owner or not repo or not path or not all(path):
        raise UserError(f"{spec!r} is not a Hub file address; write hf-hub:OWNER/REPO/PATH/IN/REPO[.pth]")
    if any(part in (".", "..") for part in (owner, repo, *path)):
        raise UserError(
            f"{spec!r}: a Hub file path cannot hold '.' or '..' segments; write the file's path inside the "
            f"repository, hf-hub:OWNER/REPO/PATH/IN/REPO[.pth]"
        )
    return f"{owner}/{repo}", "/".join(path), revision or None


def hub_file(spec: str) -> Path:
    """The local path of a Hub file, downloaded once into huggingface_hub's cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, filename, revision = parse_hub_file(spec)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except LocalEntryNotFoundError:  # first: a subclass of EntryNotFoundError
        raise CheckpointError(
            f"{spec} is not in the Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE set, or no "
            f"network); download it once online, or set HF_HUB_CACHE to the cache that holds it"
        ) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{spec}: the repository {repo_id} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{spec}: no Hub repository {repo_id!r} (or it is private; log in with `hf auth login`)"
        ) from None
