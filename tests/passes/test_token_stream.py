"""patch_slim and token_merge on models evc does not recognise: blocks, prefix and attention read from the graph."""

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from evc.ir.program import Program
from evc.ir.token_axis import token_stream
from evc.ir.view import RecognitionError
from evc.passes.patch_slim import PatchSlim
from evc.passes.token_merge import TokenMerge
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx
from tests.passes.conftest import Ctx, images, program_of
from tests.zoo import ZOO


def slim(program, keep, score="cls_attention", fuse=False):
    params = dict(keep=keep, score=score, fuse=fuse, search=None)
    return PatchSlim().run(program, params, Ctx(params))


def merge(program, r):
    params = dict(r=r, proportional=True)
    return TokenMerge().run(program, params, Ctx(params))


def unrecognised(program: Program) -> Program:
    return dataclasses.replace(program, structure=None, unrecognised="as if not recognised")


@pytest.mark.parametrize("family", ["deit_tiny", "vit_gap", "deit_tiny_distilled"])
def test_read_from_the_graph_alone_the_passes_give_what_the_recognised_structure_gives(family):
    program = program_of(family)
    depth, score = program.structure.depth, "cls_attention" if program.structure.prefix_tokens else "mean_attention"
    x = torch.from_numpy(images(4))
    for run in (lambda p: slim(p, [1.0] + [0.5] * (depth - 1), score, fuse=True), lambda p: merge(p, 3)):
        recognised, from_graph = run(program).run(x), run(unrecognised(program)).run(x)
        assert torch.equal(from_graph, recognised)
        assert not torch.allclose(from_graph, program.run(x), atol=1e-3)  # tokens did go


@pytest.fixture(scope="module")
def parallel():
    model, size, _ = ZOO["parallel_vit"]()
    return Program.from_module(model, ImageInput(size, size))


def test_a_parallel_block_vit_drops_the_patches_asked_ranked_by_both_attentions(parallel, tmp_path):
    assert parallel.structure is None
    slimmed = slim(parallel, [1.0, 0.5])
    assert [b.tokens for b in token_stream(slimmed, "test").blocks] == [17, 1 + 8]
    export_onnx(slimmed, tmp_path / "m.onnx", 17)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, slimmed.run(x).numpy(), atol=1e-4, rtol=0)


def test_a_parallel_block_vit_merges_tokens_with_keep_one_untouched(parallel):
    assert slim(parallel, 1.0) is parallel and merge(parallel, 0) is parallel
    merged = merge(parallel, 4)
    assert [b.tokens for b in token_stream(merged, "test").blocks] == [17, 13]  # 4 merged after block 0's attention


def test_search_needs_a_recognised_head(parallel):
    params = dict(keep=1.0, score="cls_attention", fuse=False,
                  search=dict(tolerance=0.01, step=8, data="calib"))
    with pytest.raises(Exception, match="search: search measures the features a recognised ViT's head reads"):
        PatchSlim().run(parallel, params, Ctx(params))


def test_a_model_whose_token_count_is_fixed_is_refused_naming_the_node():
    model, size, _ = ZOO["twins_pcpvt"]()
    program = Program.from_module(model, ImageInput(size, size))
    with pytest.raises(RecognitionError, match="pass token_merge cannot change this model's token count: node 'view' "
                                               "reshapes the 256 tokens"):
        merge(program, 4)
