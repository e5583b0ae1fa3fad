"""Models from Hugging Face transformers: `source = hf("models/vit-small")`.

The folder is what `save_pretrained` writes (config.json and model.safetensors),
relative to the spec's folder. A Hub repository id is taken from
huggingface_hub's local cache only: nothing is downloaded. The class is the
one config.json names (`architectures`), so a distilled DeiT loads with both
its heads; keyword arguments go to `from_pretrained`:

    source = hf("models/deit-tiny", attn_implementation = "eager")

    hf_files("models/deit-tiny", {}, spec_dir)      # the folder the model loads from, whose files key it
    hf_snapshot("facebook/deit-tiny-patch16-224", {}, spec_dir).revision   # the cached commit, for the manifest

A repository id resolves as `from_pretrained(..., local_files_only=True)`
resolves it: `revision` (default main) through the cache's refs, in
`cache_dir` or huggingface_hub's cache (HF_HUB_CACHE, or HF_HOME/hub). This
module imports neither torch nor transformers until a model is built: cache
keys are derived through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evc.errors import InputError, first_line

if TYPE_CHECKING:
    from torch import nn

# The from_pretrained arguments that choose which snapshot of a repository loads.
_SNAPSHOT_ARGS = ("revision", "cache_dir")


@dataclass(frozen=True)
class HfSnapshot:
    repo: str
    revision: str  # the commit hash of the snapshot
    path: Path


def hf_folder(name: str, spec_dir: Path) -> Path | None:
    """The local folder `hf("name")` names, or None for a repository id."""
    folder = spec_dir / name
    return folder if folder.is_dir() else None


def hf_files(name: str, kwargs: dict, spec_dir: Path) -> Path:
    """The folder `hf("name", **kwargs)` loads from: the spec's folder, else the repository's cached snapshot."""
    folder = hf_folder(name, spec_dir)
    return folder if folder is not None else hf_snapshot(name, kwargs, spec_dir).path


def hf_snapshot(name: str, kwargs: dict, spec_dir: Path) -> HfSnapshot:
    """Repository `name`'s snapshot in huggingface_hub's cache, at the `revision` in `kwargs` (default main)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    revision, cache_dir = _revision(kwargs), kwargs.get("cache_dir")
    try:
        path = Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError:
        raise InputError(f'hf("{name}"): no folder {spec_dir / name}, and "{name}" is not a repository id') from None
    except LocalEntryNotFoundError:
        raise InputError(_missing(name, revision, cache_dir, spec_dir)) from None
    return HfSnapshot(name, path.name, path)


def _missing(name: str, revision: str, cache_dir: str | None, spec_dir: Path) -> str:
    from huggingface_hub import constants

    at = "" if revision == "main" else f" at revision {revision}"
    return (f'hf("{name}"): no folder {spec_dir / name} and no model "{name}"{at} in huggingface_hub\'s cache '
            f"({cache_dir or constants.HF_HUB_CACHE}); fetch it once with {_download(name, revision)}")


def _revision(kwargs: dict) -> str:
    return kwargs.get("revision") or "main"


def _download(name: str, revision: str) -> str:
    return f"`hf download {name}" + ("`" if revision == "main" else f" --revision {revision}`")


def hf_model(name: str, kwargs: dict, spec_dir: Path) -> nn.Module:
    """The transformers model of `hf("name", **kwargs)`, with its weights."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the build reports its own progress
    where = hf_files(name, kwargs, spec_dir)
    if not (where / "config.json").is_file():
        hint = ("expected a folder save_pretrained wrote" if hf_folder(name, spec_dir) else
                f"fetch the whole repository with {_download(name, _revision(kwargs))}")
        raise InputError(f'hf("{name}"): {where} has no config.json; {hint}')
    # The snapshot is chosen: the files it loads are the files its key was derived from.
    kwargs = {k: v for k, v in kwargs.items() if k not in _SNAPSHOT_ARGS}
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        return _model_class(config).from_pretrained(where, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f'hf("{name}"): {first_line(e)}') from None


def _model_class(config):
    """The class config.json names, else the image classifier or the bare model of its type."""
    import transformers

    named = next((getattr(transformers, a, None) for a in config.architectures or ()), None)
    if named is not None:
        return named
    if type(config) in transformers.AutoModelForImageClassification._model_mapping:
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel
