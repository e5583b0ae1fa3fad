"""finetune: recover accuracy by knowledge distillation from the uncompressed model.

    finetune { data = train, epochs = 3, lr = 1e-4, batch = 64, teacher = original, alpha = 0.9, temperature = 1 }
    finetune { data = train }      # lr and augment = auto: fitted to the model and the images

`lr = auto` (the default) runs a short learning-rate range test first (Smith,
2015; fastai's lr_find): 100 batches at rates growing from 1e-6 to 1, the
least smoothed loss's rate over 10 (1e-4 when the loss does not fall).
`augment = auto` trains on the eval
transform below 64 pixels, and above it on random crops that keep as many
pixels as timm's 8% of 224 × 224. What was chosen is in the manifest.

It goes anywhere in `compress` (prune, finetune, prune again, finetune again)
and trains the model as the passes before it left it: DeiT's soft
distillation from the teacher (`original`, the model as loaded) mixed with
cross-entropy on the labels, AdamW with a linear warm-up and a cosine decay.
With an `evaluate` block, the epoch with the best validation top-1 is kept.
Each epoch is checkpointed in the build cache, so an interrupted build
resumes where it stopped; under `torchrun --nproc_per_node N -m evc build`
it trains with DistributedDataParallel.
"""

from __future__ import annotations

from dataclasses import replace

from evc.registry import Pass, Recovering, register_pass
from evc.spec.params import REQUIRED, AnyOf, Choice, DataRef, Float, Int, Invalid, ModelRef, Param


def _check(params, spans):
    if params["teacher"] == "none" and params["alpha"] > 0:
        raise Invalid("teacher = none leaves nothing to distil from: set alpha = 0", spans.get("alpha") or
                      spans.get("teacher"))


@register_pass(
    "finetune",
    Param("data", DataRef(), REQUIRED, "images to train on: labelled (class subfolders) unless alpha = 1"),
    Param("epochs", Int(1), 3, "passes over the data"),
    Param("lr", AnyOf((Float(0, open_low=True), Choice(("auto",)))), "auto",
          "peak learning rate of AdamW; auto: a range test on the first batches (the least-loss rate over 10)"),
    Param("batch", Int(1), 64, "images per step, over all processes together"),
    Param("teacher", ModelRef(("original", "none")), "original",
          "the model distilled from: the model as loaded, another model block, or none for cross-entropy alone"),
    Param("alpha", Float(0, 1), 0.9, "weight of the distillation loss; 1 - alpha goes to cross-entropy"),
    Param("temperature", Float(0, open_low=True), 1.0, "softmax temperature of the distillation loss"),
    Param("warmup", Float(0), 1.0, "epochs of linear warm-up before the cosine decay"),
    Param("weight_decay", Float(0), 0.05, "AdamW weight decay (none on biases and norms)"),
    Param("augment", Choice(("auto", "standard", "none")), "auto",
          "timm's random resized crop and flip, the eval transform alone (digits must not flip), or auto: none "
          "below 64 pixels, and above it crops that keep as many pixels as timm's 8% of 224 x 224"),
    Param("device", Choice(("auto", "cpu", "cuda")), "auto", "where to train: auto takes the GPU if there is one"),
    Param("seed", Int(0), 0, "seed for shuffling and augmentation"),
    check=_check,
)
class Finetune(Pass, Recovering):
    """Recover accuracy by knowledge distillation from the uncompressed model."""

    def run(self, program, params, ctx):
        from evc.passes.train import distill

        run = self.recovery(program, params, ctx)
        ctx.report("chosen", run.chosen)
        result = distill(program.graph, run.teacher, run.images, run.recipe, ctx.workspace(), _validation(ctx),
                         progress=ctx.progress.epoch)
        ctx.report("epochs", [{"epoch": e.epoch, "loss": round(e.loss, 5), "top1": e.top1} for e in result.history])
        ctx.report("best_epoch", result.best)
        return replace(program, graph=result.student.eval())

    def recovery(self, program, params, ctx):
        from evc.model.data import fitting_augmentation
        from evc.passes.train import Recipe, Run, lr_range_test

        augment, smallest = params["augment"], 0.08
        if augment == "auto":
            augment, smallest = fitting_augmentation(program.input)
        train_set = ctx.dataset(params["data"], train=augment == "standard", smallest=smallest or 0.08)
        _check_labels(program, train_set, params, ctx)
        recipe = Recipe(epochs=params["epochs"], lr=1e-4, batch=params["batch"],
                        weight_decay=params["weight_decay"], warmup_epochs=params["warmup"], alpha=params["alpha"],
                        temperature=params["temperature"], seed=params["seed"], device=params["device"])
        teacher = _teacher(params["teacher"], ctx)
        lr = params["lr"]
        if lr == "auto":
            lr, _ = lr_range_test(program.graph, teacher, train_set, recipe)
        chosen = {"lr": float(f"{lr:.3g}"), "augment": augment,
                  **({"crop_smallest": smallest} if augment == "standard" else {})}
        plain = ctx.dataset(params["data"]) if augment == "standard" else train_set
        return Run(teacher, train_set, replace(recipe, lr=lr), chosen, plain)


def _teacher(name: str, ctx):
    return None if name == "none" else ctx.model(name).eval()


def _check_labels(program, train_set, params, ctx) -> None:
    classes = train_set.classes
    if classes is None and params["alpha"] < 1:
        raise ctx.error("data", f"data '{params['data']}' has no labels (no class subfolders), which cross-entropy "
                                "needs: give labelled images, or set alpha = 1 to distil alone")
    if classes is not None and len(classes) != program.structure.num_classes:
        raise ctx.error("data", f"data '{params['data']}' has {len(classes)} classes and the model's head "
                                f"{program.structure.num_classes} outputs")


def _validation(ctx):
    """The `evaluate` block's data, labelled, for keeping the best epoch; None without one."""
    if ctx.evaluate_data is None:
        return None
    images = ctx.dataset(ctx.evaluate_data)
    return images if images.classes is not None else None
