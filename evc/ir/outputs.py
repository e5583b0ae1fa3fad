"""The one tensor evc compresses, out of whatever a model returns.

A model may return a tensor, a tuple, a dict, or a Hugging Face ModelOutput.
The Program returns one tensor: the spec's `output = "logits"` names it, and
without it evc takes the only tensor of an output that holds one (DPT's
`predicted_depth`), else `logits`, else a feature model's `pooler_output`,
else the class token of `last_hidden_state`; of a tuple, its first element.

    one_output(model(x), None, "ViTModel")        # outputs.pooler_output
    with_one_output(model, "logits")               # an nn.Module returning that tensor
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from evc.errors import InputError

_DEFAULTS = ("logits", "pooler_output")


def one_output(out, key: str | None, name: str):
    """The tensor (or torch.fx proxy of one) of `out` that evc compresses; see the module docstring."""
    if isinstance(out, Mapping):
        present = [k for k, v in out.items() if v is not None]
        if key is not None:
            if key not in present:
                raise InputError(f"output = \"{key}\": model '{name}' returns no '{key}'; it returns "
                                 + ", ".join(f"'{k}'" for k in present))
            return out[key]
        if len(present) == 1:
            return out[present[0]]
        found = next((k for k in _DEFAULTS if k in present), None)
        if found is not None:
            return out[found]
        if "last_hidden_state" in present:
            return out["last_hidden_state"][:, 0]
        raise InputError(f"model '{name}' returns " + ", ".join(f"'{k}'" for k in present)
                         + "; name the one to compress with `output = \"...\"` in the model block")
    if key is not None:
        returns = "a tuple" if isinstance(out, (tuple, list)) else "one tensor"
        raise InputError(f"output = \"{key}\": model '{name}' returns {returns}, not named outputs")
    return out[0] if isinstance(out, (tuple, list)) else out


class OneOutput(nn.Module):
    """`model`'s forward returning `one_output` of it: the same modules under the same names."""

    def __init__(self, model: nn.Module, key: str | None, name: str):
        super().__init__()
        # Share the model's registries, not hold it as a child: names stay 'blocks.0.attn.qkv'.
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.model_forward, self.key, self.name = model.forward, key, name

    def forward(self, x):
        return one_output(self.model_forward(x), self.key, self.name)
