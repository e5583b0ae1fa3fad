"""The Program: what passes transform and targets lower.

A Program is a traced model (a torch.fx GraphModule: an ordinary nn.Module a
user can run and export without evc) plus the transformer structure
recognised in its graph, and the input it expects. Passes take a Program and
return a new one; they rewrite the graph and say what changed by returning a
fresh Structure (`Program.rebuilt` re-recognises it from the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import fx, nn

from evc.errors import InputError, PassFailure
from evc.ir.recognise import RecognitionError, recognise
from evc.ir.structure import Structure
from evc.ir.trace import propagate_shapes, retraced, trace
from evc.spec.plan import ImageInput


@dataclass(frozen=True)
class Program:
    graph: fx.GraphModule
    structure: Structure | None  # None: not a ViT evc recognises; it lowers, but passes cannot compress it
    input: ImageInput
    unrecognised: str | None = None  # why recognition stopped, naming the node
    # A decomposed model (the decompose pass): its parts, each a Program of its own, and the fusion of
    # what they send (evc.ir.ensemble). `graph` then runs them all and the fusion, every part present.
    parts: tuple = ()
    fusion: nn.Module | None = None

    @classmethod
    def decomposed(cls, parts, fusion: nn.Module, image: ImageInput) -> Program:
        """The ensemble of `parts` (evc.ir.ensemble.Part) joined by `fusion`."""
        from evc.ir.ensemble import joined

        graph = joined([part.program.graph for part in parts], fusion)
        propagate_shapes(graph, example_input(image), "decomposed")
        return cls(graph, None, image, f"it is decomposed into {len(parts)} parts, each a ViT of its own",
                   tuple(parts), fusion)

    @classmethod
    def from_module(cls, module: nn.Module, image: ImageInput, output: str | None = None) -> Program:
        """`module` captured (`evc.ir.trace`) returning the one output `output` names, and recognised."""
        graph = trace(module, example_input(image), output=output)
        try:
            return cls(graph, recognise(graph), image)
        except RecognitionError as e:
            return cls(graph, None, image, str(e))

    def require_structure(self, what: str) -> Structure:
        """The recognised structure, or an error saying why `what` cannot work on this model."""
        if self.structure is None:
            raise RecognitionError("", f"{what} needs a ViT evc recognises, and this model is not one: "
                                       f"{self.unrecognised}")
        return self.structure

    def example(self) -> torch.Tensor:
        return example_input(self.input)

    def rebuilt(self, graph: fx.GraphModule) -> Program:
        """This program with `graph`, a rewritten copy of its own: shapes re-propagated, structure re-recognised."""
        graph = retraced(graph)
        try:
            propagate_shapes(graph, self.example(), "rewritten")
        except InputError as e:
            raise PassFailure(f"a pass left a model that does not run: {e}", {"graph": graph}) from e
        if self.structure is None:  # a model compressed by its pruning groups alone (evc.passes.grouped)
            return replace(self, graph=graph)
        try:
            return replace(self, graph=graph, structure=recognise(graph))
        except RecognitionError as e:
            return replace(self, graph=graph, structure=None, unrecognised=str(e))

    def run(self, images) -> torch.Tensor:
        with torch.inference_mode():
            return self.graph(torch.as_tensor(images))

    def save(self, path: Path) -> None:
        torch.save(self._state(), path)

    def _state(self) -> dict:
        # A GraphModule pickles as its code and re-traces it on load, with the
        # tracer class it was made by unless told otherwise; torch.fx's own
        # tracer reproduces the same graph and needs no evc to be importable.
        # A decomposed model keeps its parts apart, and is joined again on load.
        if self.parts:
            parts = [{"name": p.name, "classes": p.classes, "width": p.width, **p.program._state()}
                     for p in self.parts]
            return {"parts": parts, "fusion": self.fusion, "input": self.input}
        self.graph._tracer_cls = None
        return {"graph": self.graph, "structure": self.structure, "input": self.input,
                "unrecognised": self.unrecognised}

    @classmethod
    def load(cls, path: Path) -> Program:
        # evc wrote this file itself into its cache; it pickles an fx GraphModule.
        return cls._from_state(torch.load(path, map_location="cpu", weights_only=False))

    @classmethod
    def _from_state(cls, saved: dict) -> Program:
        if "parts" in saved:
            from evc.ir.ensemble import Part

            parts = [Part(p["name"], tuple(p["classes"]), cls._from_state(p), p["width"]) for p in saved["parts"]]
            return cls.decomposed(parts, saved["fusion"].eval(), saved["input"])
        graph = saved["graph"].eval()
        propagate_shapes(graph, example_input(saved["input"]), "cached")
        return cls(graph, saved["structure"], saved["input"], saved.get("unrecognised"))


def example_input(image: ImageInput) -> torch.Tensor:
    return torch.zeros(image.shape)
