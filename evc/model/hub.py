"""Checkpoints from the Hugging Face Hub: `weights = hub("timm/deit_tiny_patch16_224.fb_in1k")`.

    checkpoint = fetch(HubWeights("timm/deit_tiny_patch16_224.fb_in1k"))
    checkpoint.path        # the file in huggingface_hub's cache
    checkpoint.revision    # the commit it came from, for the manifest
    checkpoint_file(model.weights)   # a model block's weights file, a path or from the Hub

`hf_hub_download` keeps what it fetches in huggingface_hub's own cache
(`HF_HUB_CACHE`, by default ~/.cache/huggingface/hub), so a checkpoint is
downloaded once and shared with timm and transformers. Offline
(`HF_HUB_OFFLINE=1`, or the Hub unreachable) the cached copy is used. This
module imports neither torch nor timm: cache keys are derived through it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from evc.errors import InputError, first_line
from evc.spec.plan import HubWeights

# What timm's Hub repositories hold, in the order timm itself tries them.
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class HubCheckpoint:
    repo: str
    file: str
    revision: str  # the commit hash the file was resolved at
    path: Path


def checkpoint_file(weights: Path | HubWeights) -> Path:
    """The local file of a model block's weights: the path it names, or the Hub checkpoint in the cache."""
    return fetch(weights).path if isinstance(weights, HubWeights) else weights


@functools.lru_cache(maxsize=None)
def fetch(weights: HubWeights) -> HubCheckpoint:
    """The checkpoint `weights` names, downloaded into the cache or found there; once per process."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    names = (weights.file,) if weights.file else CHECKPOINT_FILES
    offline = False
    for name in names:
        try:
            path = Path(hf_hub_download(weights.repo, name, revision=weights.revision))
        except LocalEntryNotFoundError:  # not cached, and the Hub cannot be asked: try the next name
            offline = True
        except EntryNotFoundError:  # the Hub says the repository has no such file
            continue
        except (HfHubHTTPError, HFValidationError) as e:  # no such repository or revision, gated, private
            raise InputError(f"weights: {weights}: {first_line(e)}") from None
        else:
            return HubCheckpoint(weights.repo, name, _commit(path, name), path)
    raise InputError(_missing(weights, names, offline))


def _commit(path: Path, name: str) -> str:
    """The commit of a cached file: its path is <cache>/models--org--name/snapshots/<commit>/<name>."""
    return path.parents[len(Path(name).parts) - 1].name


def _missing(weights: HubWeights, names: tuple[str, ...], offline: bool) -> str:
    files = " or ".join(names)
    if not offline:
        return f'weights: {weights}: the repository holds no {files}; name its checkpoint with hub(..., file = "...")'
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    revision = "" if weights.revision == "main" else f" --revision {weights.revision}"
    return (f"weights: {weights}: {weights.repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}: "
            f"no {files}) and {why}; fetch it once with `hf download {weights.repo} {names[0]}{revision}`, "
            "or build once with network")
