"""decompose: parts shrunk for disjoint class subsets, a fusion fitted to the model's logits (DeViT)."""

import numpy as np
import pytest
import torch

from evc.ir.program import Program
from evc.passes.decompose import Decompose, class_split, relation
from evc.passes.ffn_prune import FfnPrune
from evc.passes.train import relation_divergences
from tests.passes.conftest import Ctx, images, program_of


class LabelledCtx(Ctx):
    """A pass context whose data block `train` is labelled: by the model's own top-1 predictions, unless given."""

    def __init__(self, params, program, data=None):
        super().__init__(params, images(64) if data is None else data[0])
        self.labels = program.run(self._images).argmax(-1).numpy() if data is None else data[1]
        self.original = program

    def labelled(self, name):
        return self._images, self.labels

    def dataset(self, name, train=False):
        data = torch.utils.data.TensorDataset(torch.from_numpy(self._images), torch.from_numpy(self.labels))
        data.classes, data.labels = [str(c) for c in range(10)], list(self.labels)
        return data

    def workspace(self):
        return None

    def model(self, name):
        return self.original


def decompose(program, data=None, **params):
    params = dict(parts=2, by="classes", seed=0, keep=0.5, score="l1", round_to=8, data="train", drop=True, epochs=0,
                  joint=0, lr=5e-4, batch=64, heads=None, hidden=None, relation=1.0) | params
    ctx = LabelledCtx(params, program, data)
    return Decompose().run(program, params, ctx), ctx


@pytest.fixture(scope="module")
def digits():
    """A 2-block ViT trained for a few seconds on scikit-learn's digits (32 x 32): a model that has learned
    something, its training images and labels, and its validation images and labels."""
    import timm
    from sklearn.datasets import load_digits

    from evc.spec.plan import ImageInput

    data = load_digits()
    pixels = np.kron(data.images / 16, np.ones((4, 4)))[:, None].repeat(3, axis=1).astype(np.float32)
    x, y = (pixels - 0.5) / 0.25, data.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, val = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                              num_classes=10)
    epochs, steps = 12, len(train) // 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps, pct_start=0.1)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(train), steps):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[batch])), torch.from_numpy(y[batch]))
            optimizer.zero_grad(), loss.backward(), optimizer.step(), schedule.step()
    program = Program.from_module(model.eval(), ImageInput(32, 32))
    return program, (x[train], y[train]), (x[val], y[val])


@pytest.mark.parametrize("classes, parts", [(10, 2), (10, 3), (1000, 4), (5, 5)])
def test_the_class_split_is_disjoint_and_covers_every_class(classes, parts):
    split = class_split(classes, parts, seed=0)
    assert len(split) == parts and all(split)
    assert sorted(c for part in split for c in part) == list(range(classes))
    assert max(map(len, split)) - min(map(len, split)) <= 1
    assert split == class_split(classes, parts, seed=0) != class_split(classes, parts, seed=1)


def test_one_part_keeping_everything_reproduces_the_model():
    program = program_of("deit_tiny")
    decomposed, _ = decompose(program, parts=1, keep=1.0)
    x = images(8)
    assert (decomposed.run(x) - program.run(x)).abs().max() < 1e-4  # the fusion fitted to the identity


@pytest.mark.slow
def test_each_part_is_shrunk_and_sends_its_features():
    program = program_of("vit_small")  # 6 heads, 10 classes
    decomposed, ctx = decompose(program, parts=2, keep=0.5)
    assert [p.name for p in decomposed.parts] == ["part0", "part1"]
    assert sorted(c for p in decomposed.parts for c in p.classes) == list(range(program.structure.num_classes))
    for part in decomposed.parts:
        assert [b.attn.num_heads for b in part.program.structure.blocks] == [3] * program.structure.depth
        assert part.program.structure.head == () and part.width == program.structure.embed_dim
        assert part.program.run(images(2)).shape == (2, part.width)
    assert decomposed.run(images(2)).shape == (2, program.structure.num_classes)
    assert ctx.found["classes"] == [list(p.classes) for p in decomposed.parts]


def test_explicit_widths_give_every_part_that_many_heads_and_units():
    program = program_of("vit_small")  # 6 heads of 64, MLPs of 1536
    decomposed, _ = decompose(program, keep=1.0, heads=2, hidden=104)
    for part in decomposed.parts:
        assert {(b.attn.num_heads, b.mlp.hidden) for b in part.program.structure.blocks} == {(2, 104)}


@pytest.mark.slow
def test_a_decomposed_program_saves_and_loads_as_it_was(tmp_path):
    decomposed, _ = decompose(program_of("deit_tiny"))
    decomposed.save(tmp_path / "program.pt")
    loaded = Program.load(tmp_path / "program.pt")
    assert [p.classes for p in loaded.parts] == [p.classes for p in decomposed.parts]
    assert torch.equal(loaded.run(images(4)), decomposed.run(images(4)))


@pytest.mark.slow
def test_the_fusion_fitted_batch_by_batch_is_the_fusion_fitted_at_once():
    import copy

    from evc.passes.decompose import fit

    program = program_of("vit_small")
    decomposed, ctx = decompose(program, parts=3)
    x = ctx.labelled("train")[0]
    at_once, batched = (fit(copy.deepcopy(decomposed.fusion), decomposed.parts, program, x, batch=b).linear
                        for b in (len(x), 7))
    torch.testing.assert_close(batched.weight, at_once.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.bias, at_once.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_pass_after_decompose_runs_on_every_part_and_the_fusion_is_fitted_again_to_the_model_it_split():
    import copy

    from evc.passes.decompose import fit

    loaded = program_of("deit_tiny")
    params = dict(keep=0.5, score="l1", round_to=8, data=None)
    whole = FfnPrune().run(loaded, params, Ctx(params))  # a pass before decompose: decompose splits this
    decomposed, _ = decompose(whole, keep=1.0)
    later = dict(params)
    ctx = LabelledCtx(later, whole)
    after = Decompose().each_part(decomposed, FfnPrune(), later, ctx, whole)
    for before, part in zip(decomposed.parts, after.parts):
        assert [b.mlp.hidden for b in before.program.structure.blocks] == [384] * 12
        assert [b.mlp.hidden for b in part.program.structure.blocks] == [192] * 12
    x = ctx.labelled("train")[0]
    refit = {name: fit(copy.deepcopy(after.fusion), after.parts, model, x).linear.weight
             for name, model in (("whole", whole), ("loaded", loaded))}
    assert torch.equal(after.fusion.linear.weight, refit["whole"])
    assert not torch.equal(refit["whole"], refit["loaded"])
    assert not torch.equal(after.fusion.linear.weight, decomposed.fusion.linear.weight)


@pytest.mark.slow
def test_on_a_trained_model_a_fusion_fitted_with_parts_dropped_answers_without_one(digits):
    program, train, (x, y) = digits

    def top1(logits):
        return float((logits.argmax(-1).numpy() == y).mean())

    def without(decomposed, k):
        tokens = torch.cat([p.program.run(x) if i != k else torch.zeros(len(x), p.width)
                            for i, p in enumerate(decomposed.parts)], dim=-1)
        present = torch.ones(len(x), len(decomposed.parts))
        present[:, k] = 0
        with torch.no_grad():
            return top1(decomposed.fusion(tokens, present))

    original = top1(program.run(x))
    dropped, _ = decompose(program, train, keep=0.5, score="taylor", drop=True)
    plain, _ = decompose(program, train, keep=0.5, score="taylor", drop=False)
    assert original > 0.5  # it learned the digits (0.64 after these 12 epochs; chance is 0.1)
    # half the heads and units each, not distilled: 0.59 and 0.61 here
    assert top1(dropped.run(x)) >= original - 0.1 and top1(plain.run(x)) >= original - 0.1
    # one part missing: 0.53 and 0.55 fitted with parts dropped, 0.38 and 0.31 without
    assert min(without(dropped, k) for k in (0, 1)) > max(without(plain, k) for k in (0, 1)) + 0.05


@pytest.mark.slow
def test_parts_distilled_on_their_classes_then_jointly_come_closer_to_the_model(digits):
    program, train, _ = digits
    x = train[0][:256]

    def divergence(decomposed):  # KL(model || decomposed) on training images
        teacher = torch.log_softmax(program.run(x), -1)
        return torch.sum(teacher.exp() * (teacher - torch.log_softmax(decomposed.run(x), -1)), -1).mean().item()

    pruned, _ = decompose(program, train, keep=0.5)
    distilled, _ = decompose(program, train, keep=0.5, epochs=2)
    joint, ctx = decompose(program, train, keep=0.5, epochs=2, joint=2)
    assert [e["epoch"] for e in ctx.found["joint_epochs"]] == [1, 2]
    assert divergence(joint) < divergence(distilled) < divergence(pruned)
    assert [p.width for p in joint.parts] == [p.width for p in pruned.parts] and joint.fusion.drop

    # DeViT's relation terms (on by default) drew each part's q, k and v relations towards the model's
    logits_only, _ = decompose(program, train, keep=0.5, epochs=2, relation=0)
    images = torch.from_numpy(x)

    def relations(decomposed, k):
        part = decomposed.parts[k].program
        return sum(relation_divergences(relation(part, program, 1.0), part.graph, program.graph, images))

    for k in (0, 1):
        assert relations(distilled, k) < relations(logits_only, k) and relations(distilled, k) < relations(pruned, k)
    assert not any(m._forward_hooks for p in distilled.parts for m in p.program.graph.modules())


@pytest.mark.slow
def test_relation_terms_read_the_middle_blocks_q_k_v_and_vanish_for_the_model_itself(digits):
    program, train, _ = digits
    spec = relation(program, program, 2.0)
    blocks = program.structure.blocks  # 2 blocks: DeViT's depth // 2 - 1 is the first
    assert spec.student == spec.teacher == blocks[0].attn.qkv and spec.head_dims == (16, 16)
    assert spec.weights == pytest.approx((0.2, 0.1, 0.3)) and relation(program, program, 0) is None  # 2.0 / depth
    images = torch.from_numpy(train[0][:64])
    assert relation_divergences(spec, program.graph, program.graph, images) == pytest.approx([0, 0, 0], abs=1e-6)
    assert not program.graph.get_submodule(spec.student[0])._forward_hooks  # the hooks went with the measure


def test_more_parts_than_classes_is_an_error_at_parts():
    from evc.errors import SpecError

    with pytest.raises(SpecError, match="parts: 1001 parts for 1000 classes"):
        decompose(program_of("deit_tiny"), parts=1001)
