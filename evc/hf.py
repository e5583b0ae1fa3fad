"""Models from Hugging Face transformers: `source = hf("models/vit-small")`.

The folder is what `save_pretrained` writes (config.json and model.safetensors),
relative to the spec's folder. A Hub repository id is taken from
huggingface_hub's local cache only: nothing is downloaded. The class is the
one config.json names (`architectures`), so a distilled DeiT loads with both
its heads; keyword arguments go to `from_pretrained`:

    source = hf("models/deit-tiny", attn_implementation = "eager")
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from evc.errors import InputError, first_line


def hf_folder(name: str, spec_dir: Path) -> Path | None:
    """The local folder `hf("name")` names, or None for a repository id."""
    folder = spec_dir / name
    return folder if folder.is_dir() else None


def hf_model(name: str, kwargs: dict, spec_dir: Path) -> nn.Module:
    """The transformers model of `hf("name", **kwargs)`, with its weights."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the build reports its own progress
    folder = hf_folder(name, spec_dir)
    if folder is not None and not (folder / "config.json").is_file():
        raise InputError(f'hf("{name}"): {folder} has no config.json; expected a folder save_pretrained wrote')
    where = str(folder) if folder is not None else name
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f'hf("{name}"): no folder {spec_dir / name} and no model "{name}" in '
                         f"huggingface_hub's cache ({first_line(e)})") from None
    try:
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
