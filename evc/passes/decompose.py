"""decompose: one ViT into N small ones on N devices, joined by a small fusion (DeViT).

    decompose { parts = 2, keep = 1/2, data = train }
    decompose { parts = 4, keep = 1/2, score = l1, data = train, drop = false, seed = 3 }

After DeViT (Xu et al., "DeViT: Decomposing Vision Transformers for
Collaborative Inference in Edge Devices", IEEE TMC 2024; falcon-xu/DeViT):

1. The classes, shuffled with `seed`, are cut into `parts` disjoint subsets.
2. Each part starts as a copy of the model and keeps `keep` of its heads and
   of its FFN units, ranked by head_prune's and ffn_prune's `score` on the
   images of its own classes; its classifier goes, and it sends its final
   features (its class token, or its mean over tokens) once per image.
3. The fusion maps the parts' features, concatenated, to the model's logits.
   DeViT's Linear to the teacher's token and its classifier make one Linear
   here, fitted in closed form (ridge least squares to the model's own logits
   on `data`) without touching the parts: a decomposition is usable in
   seconds on a CPU.
4. With `epochs`, each part is first distilled from the model on its own
   classes' images (DeViT's per-part distillation), by finetune's engine:
   the logits' KD and cross-entropy, and DeViT's relation terms, which draw
   the token-to-token relations of the part's q, k and v at the middle
   attention block to the model's (DeViT's weights 0.2, 0.1 and 0.3, over
   the depth as DeViT's code has them, times `relation`).
5. With `joint`, the parts and the fusion are then distilled together from
   the model on all the images, and the fusion fitted again on the result.
6. With `drop` (the default) the fit also sees every image with each part
   missing in turn: zeros for its features and a 0 for its flag, the fusion's
   second input. A coordinator can then answer from the other parts.

Passes written after decompose apply to every part, and the fusion is fitted
again after each of them.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

from evc.registry import Pass, Splitting, register_pass
from evc.spec.params import REQUIRED, Choice, DataRef, Flag, Float, Int, Param, Ratio

if TYPE_CHECKING:  # numpy is imported where it is used: `evc check` imports every pass, and numpy takes 0.1 s
    import numpy as np

RIDGE = 1e-6  # of the features' mean square: enough to settle collinear columns, too little to bias the fit


@register_pass(
    "decompose",
    Param("parts", Int(1), REQUIRED, "how many part models, one per device"),
    Param("by", Choice(("classes",)), "classes", "what each part is shrunk for: a disjoint subset of the classes"),
    Param("seed", Int(0), 0, "seed the classes are shuffled with before they are split"),
    Param("keep", Ratio(), 1.0, "share of its heads and of its FFN units each part keeps"),
    Param("heads", Int(1), None, "heads each part keeps in every attention (instead of `keep`'s share)",
          not_with=("keep",)),
    Param("hidden", Int(1), None, "FFN units each part keeps in every MLP, rounded to `round_to` (instead of "
                                  "`keep`'s share)", not_with=("keep",)),
    Param("score", Choice(("l1", "taylor")), "taylor",
          "how a part ranks heads and units: weight norms, or Taylor importance on its own classes' images"),
    Param("round_to", Int(1), 8, "keep each part's FFN width a multiple of this"),
    Param("data", DataRef(), REQUIRED, "labelled images (class subfolders): the parts' scores and the fusion's fit"),
    Param("drop", Flag(), True, "fit the fusion with each part missing in turn too, so the others answer without it"),
    Param("epochs", Int(0), 0, "epochs each part is distilled from the model on its own classes' images, with "
                               "finetune's engine; 0 leaves the parts as pruned"),
    Param("joint", Int(0), 0, "epochs the parts and the fusion are then distilled together from the model on all "
                              "of `data` (DeViT's last stage), with finetune's engine; the fusion is then refitted"),
    Param("relation", Float(0), 1.0, "weight of DeViT's relation terms (q, k and v at the middle attention block) in "
                                     "each part's distillation, times DeViT's own (0.2, 0.1, 0.3); 0 leaves them out"),
    Param("lr", Float(0, open_low=True), 5e-4, "peak learning rate of those distillations"),
    Param("batch", Int(1), 64, "images per step of those distillations"),
)
class Decompose(Pass, Splitting):
    """Split the model into parts, each shrunk for a subset of the classes, joined by a fitted fusion."""

    def run(self, program, params, ctx):
        program.require_structure("pass decompose")
        import numpy as np

        from evc.ir.ensemble import Fusion, Part

        if program.parts:
            raise ctx.error("parts", "the model is decomposed already: decompose once in a compress block")
        images, labels = ctx.labelled(params["data"])
        structure = program.structure
        if labels is None:
            raise ctx.error("data", f"data '{params['data']}' has no labels (no class subfolders): decompose splits "
                                    "the classes among the parts")
        if params["parts"] > structure.num_classes:
            raise ctx.error("parts", f"{params['parts']} parts for {structure.num_classes} classes: each part needs "
                                     "one class at least")
        split = class_split(structure.num_classes, params["parts"], params["seed"])
        parts = []
        for k, classes in enumerate(split):
            shrunk = _shrunk(program, images[np.isin(labels, classes)], params, ctx)
            if params["epochs"]:
                shrunk = _distilled(shrunk, program, classes, params, ctx, f"part{k}")
            features = _features(shrunk)
            parts.append(Part(f"part{k}", classes, features, int(features.run(images[:1]).shape[-1])))
        fusion = Fusion(tuple(p.width for p in parts), structure.num_classes)
        fusion.fitted_on, fusion.drop = params["data"], params["drop"]
        decomposed = program.decomposed(parts, fit(fusion, parts, program, images), program.input)
        ctx.report("classes", [list(c) for c in split])
        if params["joint"]:
            decomposed = _jointly(decomposed, program, images, params, ctx)
        return decomposed

    def each_part(self, program, plugin, params, ctx, whole):
        """Another pass written after decompose: run on every part, then the fusion fitted again to `whole`,
        the model decompose split, as it was first fitted."""
        images, _ = ctx.labelled(program.fusion.fitted_on)
        parts = [replace(p, program=plugin.run(p.program, params, ctx)) for p in program.parts]
        parts = [replace(p, width=int(p.program.run(images[:1]).shape[-1])) for p in parts]
        return program.decomposed(parts, fit(copy.deepcopy(program.fusion), parts, whole, images), program.input)


def class_split(classes: int, parts: int, seed: int) -> list[tuple[int, ...]]:
    """The classes shuffled with `seed` and cut into `parts` disjoint subsets, as even as they go (DeViT)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(classes)
    return [tuple(sorted(int(c) for c in chunk)) for chunk in np.array_split(order, parts)]


class _OnImages:
    """What head_prune and ffn_prune ask of their context, answered for one part: `keep` per block."""

    def __init__(self, images: np.ndarray, ctx, keep: tuple[float, ...]):
        self._images, self._ctx, self._keep = images, ctx, keep

    def per_layer(self, key, depth):
        return self._keep

    def images(self, name):
        return self._images

    def report(self, key, value):
        pass

    def error(self, key, message):
        return self._ctx.error(key, message)


def _shrunk(program, images: np.ndarray, params, ctx):
    """A copy of `program` with `keep` of its heads and FFN units, ranked on `images`."""
    from evc.passes.ffn_prune import FfnPrune
    from evc.passes.head_prune import HeadPrune

    data = "part" if params["score"] == "taylor" else None
    blocks = program.structure.blocks
    if any(b.attn for b in blocks):
        keep = _shares(params["heads"], [b.attn and b.attn.num_heads for b in blocks], params["keep"], "heads", ctx)
        program = HeadPrune().run(program, dict(keep=keep, score=params["score"], scope="layer", min_heads=1,
                                                data=data), _OnImages(images, ctx, keep))
    keep = _shares(params["hidden"], [b.mlp and b.mlp.hidden for b in program.structure.blocks], params["keep"],
                   "hidden", ctx)
    return FfnPrune().run(program, dict(keep=keep, score=params["score"], round_to=params["round_to"], data=data),
                          _OnImages(images, ctx, keep))


def _shares(count: int | None, widths: list[int | None], keep: float, key: str, ctx) -> tuple[float, ...]:
    """The share of each block's width that keeps `count` of it, or `keep` everywhere without a count."""
    if count is None:
        return (keep,) * len(widths)
    if count > max(w or 0 for w in widths):
        raise ctx.error(key, f"{key} = {count}: the model's widest block has {max(w or 0 for w in widths)}")
    return tuple(min(1.0, count / w) if w else 1.0 for w in widths)


def _distilled(part, teacher, classes: tuple[int, ...], params, ctx, name: str):
    """`part` distilled from `teacher` on its own classes' images (DeViT), through finetune's engine: each
    epoch checkpointed in the build cache, so an interrupted build resumes."""
    from torch.utils.data import Subset

    from evc.passes.train import Recipe, distill

    data = ctx.dataset(params["data"])
    subset = Subset(data, [i for i, label in enumerate(data.labels) if label in classes])
    subset.classes = data.classes
    recipe = Recipe(epochs=params["epochs"], lr=params["lr"], batch=params["batch"], alpha=0.9, temperature=1.0,
                    seed=params["seed"], relation=relation(part, teacher, params["relation"]))
    workspace = ctx.workspace()
    result = distill(part.graph, teacher.graph, subset, recipe, workspace and workspace / name,
                     progress=ctx.progress.epoch if getattr(ctx, "progress", None) else None)
    return replace(part, graph=result.student.eval())


def relation(part, teacher, weight: float):
    """DeViT's relation terms between a part and the model it was cut from, at the middle of the blocks that
    have attention in both (DeViT's depth // 2 - 1); None when `weight` is 0 or the attention has no
    q, k and v projections to read (cascaded heads, each with its own)."""
    from evc.passes.train import Relation

    pairs = [(s.attn, t.attn) for s, t in zip(part.structure.blocks, teacher.structure.blocks) if s.attn and t.attn]
    if not weight or not pairs:
        return None
    mine, theirs = pairs[max(0, len(pairs) // 2 - 1)]
    if mine.heads_out or theirs.heads_out or {len(mine.qkv), len(theirs.qkv)} - {1, 3}:
        return None
    # DeViT divides the terms by the part's depth, though it reads one block
    return Relation(mine.qkv, theirs.qkv, (mine.head_dim, theirs.head_dim),
                    tuple(weight * w / len(part.structure.blocks) for w in Relation.weights))


def _jointly(decomposed, teacher, images: np.ndarray, params, ctx):
    """The parts and the fusion distilled together from `teacher` on all of the data, through finetune's
    engine, every part present; the fusion is then fitted again on the trained parts, with parts dropped."""
    from evc.passes.train import Recipe, distill

    recipe = Recipe(epochs=params["joint"], lr=params["lr"], batch=params["batch"], alpha=0.9, temperature=1.0,
                    seed=params["seed"])
    workspace = ctx.workspace()
    result = distill(decomposed.graph, teacher.graph, ctx.dataset(params["data"]), recipe,
                     workspace and workspace / "joint", progress=ctx.progress.epoch if getattr(ctx, "progress", None)
                     else None)
    trained = result.student.eval()
    parts = [replace(p, program=replace(p.program, graph=trained.get_submodule(f"parts.{k}")))
             for k, p in enumerate(decomposed.parts)]
    ctx.report("joint_epochs", [{"epoch": e.epoch, "loss": round(e.loss, 5)} for e in result.history])
    return decomposed.decomposed(parts, fit(copy.deepcopy(decomposed.fusion), parts, teacher, images),
                                 decomposed.input)


def _features(program):
    """`program` without its classifier: it returns what the classifier read."""
    from evc.passes.surgery import copy_graph, features

    return program.rebuilt(features(copy_graph(program.graph), program.structure.head))


def fit(fusion, parts, teacher, images: np.ndarray, batch: int = 256):
    """`fusion` fitted by ridge least squares to the teacher's logits on `images`, in float64; with
    `fusion.drop`, on every image with each part missing in turn too. The normal equations are summed
    batch by batch, so the fit holds one batch's features at a time, whatever the number of images."""
    import numpy as np
    import torch

    width = sum(fusion.widths) + len(parts) + 1  # the features, a flag per part, the bias
    gram, moment = np.zeros((width, width)), 0.0
    for start in range(0, len(images), batch):
        x, y = _rows(fusion, parts, teacher, images[start:start + batch])
        gram += x.T @ x
        moment = moment + x.T @ y
    gram += RIDGE * np.trace(gram) / len(gram) * np.eye(len(gram))
    solution = np.linalg.solve(gram, moment)
    with torch.no_grad():
        fusion.linear.weight.copy_(torch.from_numpy(solution[:-1].T))
        fusion.linear.bias.copy_(torch.from_numpy(solution[-1]))
    return fusion.eval()


def _rows(fusion, parts, teacher, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fit's inputs for `images` (the parts' features, 1 per part present, 1 for the bias) and targets
    (the teacher's logits); with `fusion.drop`, the same images again with each part missing in turn."""
    import numpy as np

    tokens = np.concatenate([p.program.run(images).numpy() for p in parts], axis=1).astype(np.float64)
    target = _run(teacher, images).astype(np.float64)
    ones = np.ones((len(images), len(parts) + 1))
    rows, targets = [np.concatenate([tokens, ones], axis=1)], [target]
    if fusion.drop and len(parts) > 1:
        edges = np.cumsum([0, *fusion.widths])
        for k in range(len(parts)):
            missing = rows[0].copy()
            missing[:, edges[k]:edges[k + 1]] = 0
            missing[:, edges[-1] + k] = 0
            rows.append(missing)
            targets.append(target)
    return np.concatenate(rows), np.concatenate(targets)


def _run(model, images: np.ndarray) -> np.ndarray:
    import torch

    if hasattr(model, "run"):
        return model.run(images).numpy()
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()
