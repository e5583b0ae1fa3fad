"""Transformers no earlier issue named (tests/zoo.py), as the load stage takes them: captured computing the
model's own output, saved and loaded as the cache does, its pruning groups found, its MACs those an
independent count of the ONNX finds, lowered to ONNX with parity. Most are not recognised as a ViT
(structure None): capture, groups, MACs and lowering must not need it."""

import functools

import pytest
import torch

from evc.ir.groups import channel_groups
from evc.ir.macs import summarize
from evc.ir.outputs import one_output
from evc.ir.program import Program
from evc.runtime.parity import compare
from evc.spec.plan import ImageInput
from evc.targets.onnx import export_onnx, session
from tests.ir.test_macs import onnx_file_macs
from tests.zoo import ZOO, params

# The fast loop keeps one model of each kind of capture: a timm ViT variant, a MetaFormer on maps, an attention
# pool, and a Hugging Face model by torch.export with a map output; the full run takes them all.
SLOW = frozenset(ZOO) - {"parallel_vit", "poolformerv2", "siglip", "hf_dpt"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second thread adds only synchronisation, seconds of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def captured(name: str):
    """(model, its Program, two images, the model's output on them): shared by the tests of one model."""
    model, size, output = ZOO[name]()
    program = Program.from_module(model, ImageInput(size, size), output)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = one_output(model(images), output, name)
    return model, program, images, reference


@functools.cache
def lowered(name: str, folder):
    """The Program as ONNX, as a cpu target lowers it."""
    path = folder / f"{name}.onnx"
    export_onnx(captured(name)[1], path, 17)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_the_captured_program_computes_the_models_output_on_any_batch(name):
    _, program, images, reference = captured(name)
    with torch.no_grad():
        torch.testing.assert_close(program.graph(images), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_a_saved_program_loads_with_the_same_nodes(name, tmp_path):
    """The build cache keeps Programs: a structure, an explain or a profile names nodes of the loaded copy."""
    program = captured(name)[1]
    program.save(tmp_path / "program.pt")
    loaded = Program.load(tmp_path / "program.pt")
    assert [n.name for n in loaded.graph.graph.nodes] == [n.name for n in program.graph.graph.nodes]


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_pruning_groups_are_found(name):
    groups = channel_groups(captured(name)[1].graph)
    assert groups and all(g.kind in ("heads", "head_dim", "units", "stream", "frozen") for g in groups)


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_macs_are_those_an_independent_count_of_the_onnx_finds(name, folder):
    program = captured(name)[1]
    counted = summarize(program.graph, program.structure, program.example()).macs
    assert counted == pytest.approx(onnx_file_macs(lowered(name, folder)), rel=0.01)


@pytest.mark.parametrize("name", params(slow=SLOW))
def test_the_onnx_matches_pytorch_within_1e_4(name, folder):
    _, _, images, reference = captured(name)
    reference = reference[:1].numpy()  # the ONNX is exported at batch 1
    parity = compare(reference, session(lowered(name, folder))(images[:1].numpy()))
    assert parity.max_abs_diff <= 1e-4 and parity.cosine > 0.99999
    assert (parity.top1_agreement is None) == (reference.ndim != 2)  # a map is judged on cosine and max |Δ|
