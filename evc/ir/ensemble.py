"""A model decomposed into parts that run apart, and the fusion that joins what they send (DeViT).

    part.program.run(images)            # (B, part.width): the features part k sends
    fusion(tokens, present)             # tokens (B, Σ widths), present (B, parts) -> logits
    joined(parts, fusion)               # the ensemble as one GraphModule, every part present

A part is an ordinary Program (a ViT evc recognises, its classifier dropped), so
any pass applies to it. The fusion is one Linear over the parts' features and a
0/1 flag per part: a part that did not answer sends zeros and a 0, and a fusion
fitted with parts dropped answers from the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass(frozen=True)
class Part:
    name: str  # "part0", ...: its artifacts' and its server's name
    classes: tuple[int, ...]  # the classes whose images its widths were chosen on (DeViT's split)
    program: object  # evc.ir.program.Program: images -> (B, width) features
    width: int  # features it sends per image


class Fusion(nn.Module):
    """The parts' features, concatenated, and which parts answered, mapped to logits by one Linear."""

    def __init__(self, widths: tuple[int, ...], classes: int):
        super().__init__()
        self.widths = tuple(widths)
        self.linear = nn.Linear(sum(widths) + len(widths), classes)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([tokens, present], dim=-1))


class _Joined(nn.Module):
    def __init__(self, parts: list[nn.Module], fusion: Fusion):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([part(x) for part in self.parts], dim=-1)
        present = tokens.new_ones(tokens.shape[0], len(self.parts))
        return self.fusion(tokens, present)


class _PartsWhole(fx.Tracer):
    """Keeps each part and the fusion one call: the ensemble's graph names them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        whole = qualname == "fusion" or (qualname.startswith("parts.") and qualname.count(".") == 1)
        return whole or super().is_leaf_module(m, qualname)


def joined(parts: list[nn.Module], fusion: Fusion) -> fx.GraphModule:
    """The ensemble as one GraphModule: every part on the image, then the fusion, all parts present."""
    module = _Joined(parts, fusion)
    return fx.GraphModule(module, _PartsWhole().trace(module), class_name="Decomposed")
