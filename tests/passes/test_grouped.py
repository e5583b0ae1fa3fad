"""head_prune and ffn_prune by the graph's pruning groups, on models evc does not recognise."""

import copy
import dataclasses
import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from evc.errors import PassFailure, SpecError
from evc.ir.groups import channel_groups
from evc.ir.macs import summarize
from evc.ir.program import Program
from evc.ir.prunable import candidates
from evc.passes import ffn_prune, head_prune
from evc.passes.grouped import pruned
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx
from tests.ir.test_groups import FAMILIES

UNRECOGNISED = ["parallel", "metaformer", pytest.param("xcit", marks=pytest.mark.slow),
                pytest.param("edgenext", marks=pytest.mark.slow)]
HEADS = dict(keep=0.5, score="l1", scope="layer", min_heads=1, data=None)
UNITS = dict(keep=0.5, score="l1", round_to=8, data=None)


class Ctx:
    """A PassContext for calling a pass directly: one keep for every group, warnings kept."""

    def __init__(self, images=None):
        self.warnings, self._images = [], images

    def per_layer(self, key, depth):
        return (0.5,) * depth

    def images(self, name):
        return self._images

    def warn(self, message):
        self.warnings.append(message)

    def error(self, key, message):
        return SpecError.at("test.evc", "", None, f"{key}: {message}")


@functools.cache
def _captured(family: str) -> Program:
    torch.manual_seed(0)
    build, size = FAMILIES[family]
    return Program.from_module(build().eval(), ImageInput(size, size))


def program_of(family: str) -> Program:
    program = _captured(family)
    return dataclasses.replace(program, graph=copy.deepcopy(program.graph))


def inputs(program: Program, n: int = 2) -> torch.Tensor:
    return torch.randn((n, *program.example().shape[1:]), generator=torch.Generator().manual_seed(1))


def compressed(program: Program, ctx=None) -> Program:
    ctx = ctx or Ctx()
    program = head_prune._by_groups(program, HEADS, ctx)
    return ffn_prune._by_groups(program, UNITS, ctx)


@pytest.mark.parametrize("family", UNRECOGNISED)
def test_the_models_are_ones_evc_does_not_recognise(family):
    assert _captured(family).structure is None


@pytest.mark.parametrize("family", UNRECOGNISED)
def test_head_and_ffn_prune_keep_half_of_each_group_and_cut_macs(family):
    program = program_of(family)
    groups = channel_groups(program.graph)
    heads, units = candidates(program.graph, "heads", groups), candidates(program.graph, "units", groups)
    after = compressed(program)
    left = channel_groups(after.graph)
    assert [g.heads for g in candidates(after.graph, "heads", left)] == [round(g.heads / 2) for g in heads]
    assert [g.width for g in candidates(after.graph, "units", left)] == [ffn_prune.width(0.5, g.width, 8)
                                                                        for g in units]
    before_macs = summarize(program.graph, None, program.example()).total.macs
    assert summarize(after.graph, None, after.example()).total.macs < 0.8 * before_macs


def test_a_model_without_heads_keeps_its_heads_and_says_so():
    ctx = Ctx()
    program = program_of("metaformer")
    assert head_prune._by_groups(program, HEADS, ctx) is program
    assert ctx.warnings == ["the graph has no attention heads to remove; the model is left as it is"]


def test_a_model_with_nothing_to_prune_is_refused_naming_what_froze_it():
    gm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                             torch.nn.Flatten(), torch.nn.Linear(8, 10))
    program = Program.from_module(gm.eval(), ImageInput(16, 16))
    with pytest.raises(SpecError, match="nothing in this model can be pruned.*frozen: .*node"):
        head_prune._by_groups(program, HEADS, Ctx())


def test_taylor_ranks_a_silenced_head_last():
    program = program_of("parallel")
    (first, *_) = candidates(program.graph, "heads")
    proj = next(m for m in first.members if m.dim == 1)
    with torch.no_grad():  # head 2 of the first attention writes nothing: it cannot matter
        owner, _, leaf = proj.name.rpartition(".")
        weight = getattr(program.graph.get_submodule(owner), leaf)
        weight[:, torch.as_tensor(first.channels[proj] == 2)] = 0
    images = np.random.default_rng(0).standard_normal((4, *program.example().shape[1:])).astype(np.float32)
    from evc.passes.grouped import taylor

    (scores,) = taylor(program.graph, [first], images)
    assert scores.argmin() == 2 and scores[2] == 0 and (np.delete(scores, 2) > 0).all()


def test_a_cut_that_changes_the_outputs_is_an_internal_error_with_a_reproducer():
    program = program_of("parallel")
    (group, *_) = candidates(program.graph, "heads")
    broken = dataclasses.replace(group, members=group.members[:-1])  # forgets one member: no longer closed
    with pytest.raises(PassFailure, match="cutting pruning group .* to 2 of 4 changed the model's outputs") as e:
        pruned(program, [(broken, [0, 1])])
    assert e.value.render().startswith("internal error: ")
    reproducer = e.value.reproducer
    assert reproducer["keep"] == [0, 1] and reproducer["graph"] is program.graph
    assert len(reproducer["group"]["members"]) == len(group.members) - 1


@pytest.mark.parametrize("family", ["parallel", "metaformer"])
def test_the_compressed_model_exports_to_onnx_with_parity(family, tmp_path):
    after = compressed(program_of(family))
    export_onnx(after, tmp_path / "m.onnx", 17)
    x = inputs(after, 1)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, after.graph(x).numpy(), atol=1e-4, rtol=0)


def test_scope_global_ranks_every_heads_group_together_keeping_min_heads_in_each():
    program = program_of("parallel")
    groups = candidates(program.graph, "heads")
    with torch.no_grad():  # the first attention's heads made the weakest of the model
        for member in groups[0].members:
            owner, _, leaf = member.name.rpartition(".")
            getattr(program.graph.get_submodule(owner), leaf).mul_(1e-3)
    after = head_prune._by_groups(program, {**HEADS, "scope": "global", "min_heads": 1}, Ctx())
    qkv = [m.name.removesuffix(".weight") for g in groups for m in g.members[:1]]
    kept = [after.graph.get_submodule(name).out_features // (3 * g.head_dim) for name, g in zip(qkv, groups)]
    assert kept[0] == 1 and sum(kept) == sum(g.heads for g in groups) // 2
