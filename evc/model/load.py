"""The load stage: a model from timm, Hugging Face transformers (evc.model.hf) or the user's code, with its weights.

Weights are read from a file the spec names, or from huggingface_hub's cache
for `hub(...)` (evc.model.hub fetches them there); timm never downloads on its own.
Checkpoints are adapted by one filter function, `checkpoint_state`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from evc.errors import InputError, at_value
from evc.spec.params import did_you_mean
from evc.spec.plan import ModelPlan, Source

_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def build_module(source: Source, spec_dir: Path) -> nn.Module:
    """An nn.Module in eval mode, randomly initialised from a fixed seed, so random-weight builds repeat."""
    kwargs = dict(source.kwargs)
    torch.manual_seed(0)
    if source.kind == "timm":
        module = _timm_model(source.name, kwargs)
    elif source.kind == "hf":
        from evc.model.hf import hf_model

        module = hf_model(source.name, kwargs, spec_dir)
    else:
        module = _python_model(source.name, kwargs, spec_dir)
    return module.eval()


def _timm_model(name: str, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise InputError(f"timm has no model '{name}'" + (f"; {hint}" if hint else ""))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise InputError(f"timm(\"{name}\"): {e}") from None


def _python_model(ref: str, kwargs: dict, spec_dir: Path) -> nn.Module:
    module_name, factory_name = ref.split(":")
    if str(spec_dir) not in sys.path:
        sys.path.insert(0, str(spec_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise InputError(f'python("{ref}"): cannot import {e.name!r} (searched the spec\'s folder {spec_dir} '
                         f"and the Python path)") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputError(f'python("{ref}"): module {module_name} has no factory {factory_name!r}')
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's own code: report it, do not crash
        raise InputError(f'python("{ref}") raised {type(e).__name__}: {e}') from None
    if not isinstance(model, nn.Module):
        raise InputError(f'python("{ref}") returned {type(model).__name__}, not an nn.Module')
    return model


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's input, not our crash
        raise InputError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def checkpoint_state(checkpoint) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint: unwrapped and without DataParallel's prefix."""
    state = checkpoint
    while isinstance(state, dict):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("the checkpoint holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, path: Path, model_name: str) -> None:
    state = checkpoint_state(read_checkpoint(path))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                 for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label}: {_first(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
    if problems:
        raise InputError(f"checkpoint {path} does not fit model '{model_name}': " + "; ".join(problems))
    module.load_state_dict(state)


def _first(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model(model: ModelPlan, spec_dir: Path, plan=None) -> nn.Module:
    """A model block's module with its weights: a file, or a checkpoint from the Hugging Face Hub.

    With the `plan`, an error in the model's source or weights is a spec error at that value."""
    from evc.model.hub import checkpoint_file

    with at_value(plan, model.spans, "source"):
        module = build_module(model.source, spec_dir)
    if model.weights is not None:
        with at_value(plan, model.spans, "weights"):
            load_weights(module, checkpoint_file(model.weights), model.name)
    return module
