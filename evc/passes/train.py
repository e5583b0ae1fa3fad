"""Finetuning by knowledge distillation: the engine a `finetune` pass calls.

    recipe = Recipe(epochs=3, lr=1e-4, batch=64, alpha=0.9, temperature=1.0)
    result = distill(student, teacher, train_set, recipe, checkpoints=folder, val_set=val_set)
    result.student, result.history, result.best

The loss is DeiT's soft distillation (Touvron et al., 2021) mixed with cross-entropy on the labels:

    alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - alpha) * CE(student, labels)

With `recipe.relation`, DeViT's relation terms are added: at one block, the student's queries, keys and
values each match the teacher's token-to-token relations (see `Relation`).

Under torchrun, after `init_distributed()`, the same call trains with DistributedDataParallel.
`batch` is the global batch, split across ranks, so N ranks see the same batches one process
would. Only rank 0 reads and writes checkpoints and reports progress, and every rank returns
the same student.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

CHECKPOINT = "distill.pt"


@dataclass(frozen=True)
class Relation:
    """DeViT's relation distillation (Xu et al., after MiniLM): at one block, each of q, k and v gives the
    relations of the tokens, softmax(X Xᵀ / √head_dim) with X the heads' vectors side by side (B, N, C),
    and the student's are drawn to the teacher's by KL(teacher ‖ student), weighted per q, k and v. The
    relations are N × N whatever the widths, so a student with fewer heads or a narrower head is matched
    to its teacher as it is."""

    student: tuple[str, ...]  # module names giving q, k and v: one fused projection (q | k | v), or three
    teacher: tuple[str, ...]
    head_dims: tuple[int, int]  # the student's and the teacher's
    weights: tuple[float, float, float] = (0.2, 0.1, 0.3)  # DeViT's, for q, k and v


@dataclass(frozen=True)
class Recipe:
    epochs: int = 3
    lr: float = 1e-4
    batch: int = 64  # global, over all ranks
    weight_decay: float = 0.05  # not on biases, norms or a timm model's no_weight_decay() parameters
    warmup_epochs: float = 1.0  # linear warm-up, in epochs (fractions allowed), never more than half the run
    alpha: float = 0.9  # weight of the distillation loss; cross-entropy on the labels gets 1 - alpha
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when there is one), "cpu" or "cuda"
    workers: int = 0  # DataLoader worker processes per rank
    relation: Relation | None = None  # DeViT's relation terms, added to the loss; they need a teacher

    def __post_init__(self):
        if self.epochs < 1 or self.batch < 1 or not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise ValueError(f"not a trainable recipe: {self}")


@dataclass(frozen=True)
class Run:
    """What a finetune trains with: its teacher (None for cross-entropy alone), its images (a Dataset of
    (image, label)) and its recipe; `chosen`: what it fitted where the spec said auto, for the manifest."""

    teacher: nn.Module | None
    images: Dataset
    recipe: Recipe
    chosen: dict
    plain: Dataset | None = None  # the same images with the eval transform, where `images` augments them


@dataclass(frozen=True)
class Epoch:
    epoch: int  # counted from 1
    loss: float  # mean training loss over every rank's samples
    top1: float | None  # on the validation set, when one is given
    samples_per_s: float  # all ranks together
    seconds: float
    lr: float  # after the epoch's last step


@dataclass
class Result:
    student: nn.Module  # on the CPU
    history: list[Epoch]
    best: int  # the epoch whose weights `student` holds: the best validated one, else the last


# progress(record, epochs, seconds_left); a bound method such as `reporter.epoch` serves as well.
Report = Callable[[Epoch, int, float], None]


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (0, 1) when not launched by torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")  # env:// reads MASTER_ADDR and MASTER_PORT
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def logits(output) -> Tensor:
    """Class logits. A distilled DeiT returns (class head, distillation head); like timm's eval forward,
    the heads are averaged."""
    if isinstance(output, (tuple, list)):
        return torch.stack(list(output)).mean(0)
    return output


def distillation_loss(student: Tensor, teacher: Tensor | None, labels: Tensor, alpha: float,
                      temperature: float, per_image: bool = False) -> Tensor:
    """The batch's mean loss, or each image's (`per_image`). A term whose weight is 0 is not computed, so
    alpha = 1 never reads labels and alpha = 0 needs no teacher."""
    loss = student.new_zeros(len(student) if per_image else ())
    if alpha > 0:
        t = temperature
        # T² keeps the soft term's gradients on the scale of the hard term's as T grows (Hinton et al., 2015).
        a, b = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
        kl = (F.kl_div(a, b, reduction="none", log_target=True).sum(-1) if per_image
              else F.kl_div(a, b, reduction="batchmean", log_target=True))
        loss = loss + alpha * t * t * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student, labels, reduction="none" if per_image else "mean")
    return loss


def schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> LRScheduler:
    """Linear warm-up to `recipe.lr`, then a cosine to 0, stepped once per iteration."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(round(recipe.warmup_epochs * steps_per_epoch), total // 2)
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    # Starting at lr / (warmup + 1) rather than 0 makes the first step count.
    warm = LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return SequentialLR(optimizer, [warm, CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])


def fingerprint(recipe: Recipe, student: nn.Module, teacher: nn.Module | None, steps_per_epoch: int) -> str:
    """What a checkpoint must have been trained from to be resumed: the recipe, the steps an epoch takes,
    and the starting student's and the teacher's weights, names and shapes. Device and workers change
    no result, so a run interrupted on one machine may finish on another."""
    from evc.keys import checkpoint_key

    run = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("device", "workers")}
    return checkpoint_key(run, steps_per_epoch, (student, teacher))


def top_k(model: nn.Module, dataset: Dataset, batch: int = 256, k: int = 1) -> float:
    """Top-k accuracy on the model's device; under torchrun each rank scores a share and all get the total."""
    rank, world = _rank_world()
    device = next(model.parameters(), torch.empty(0)).device
    correct = torch.zeros((), device=device)
    training = model.training
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch):
            predicted = logits(model(images.to(device))).topk(k, -1).indices
            correct += (predicted == labels.to(device)[:, None]).any(-1).sum()
    model.train(training)
    (hits,) = _sum_over_ranks(device, correct.item())
    return hits / len(dataset)


def top1(model: nn.Module, dataset: Dataset, batch: int = 256) -> float:
    return top_k(model, dataset, batch, 1)


def held_out_scores(model: nn.Module, teacher: nn.Module | None, dataset: Dataset, recipe: Recipe,
                    labelled: bool = True, batch: int = 256) -> tuple[Tensor, Tensor | None]:
    """Each image's loss by the recipe on `dataset`, and whether the model classed it right (None when
    `labelled` is False), in eval mode on the CPU: how a budget judges a candidate after its short recovery."""
    alpha = recipe.alpha if labelled else 1.0  # unlabelled images are judged by the teacher alone
    losses, right = [], []
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch):
            out = logits(model(images))
            target = logits(teacher(images)) if teacher is not None and alpha > 0 else None
            losses.append(distillation_loss(out, target, labels, alpha, recipe.temperature, per_image=True))
            right.append(out.argmax(-1) == labels)
    return torch.cat(losses), (torch.cat(right) if labelled else None)


def print_epoch(record: Epoch, epochs: int, seconds_left: float, console: Console | None = None) -> None:
    """The default progress: one line per epoch on stderr."""
    top = f"  top-1 {record.top1:.2%}" if record.top1 is not None else ""
    (console or Console(stderr=True)).print(
        f"epoch {record.epoch}/{epochs}  loss {record.loss:.4f}{top}  {record.samples_per_s:,.0f} samples/s  "
        f"{timedelta(seconds=round(seconds_left))} left", soft_wrap=True, highlight=False)


@dataclass
class _Best:
    epoch: int = 0
    top1: float = -1.0
    state: dict | None = None  # kept only when validated; otherwise the last epoch is the answer


def distill(student: nn.Module, teacher: nn.Module | None, train_set: Dataset, recipe: Recipe,
            checkpoints: Path | None = None, val_set: Dataset | None = None,
            progress: Report | None = None) -> Result:
    """Finetune a copy of `student` towards `teacher`; the modules passed in are left as they were.

    `teacher` may be None when alpha is 0. With `checkpoints`, each epoch is saved there, and a later
    call with the same recipe and models resumes after the last saved epoch, or returns at once when
    all were. The fingerprint does not cover the data: key the folder by it.
    """
    teacher = teacher if recipe.alpha > 0 else None  # cross-entropy alone needs none
    if teacher is None and recipe.alpha > 0:
        raise ValueError("distillation with alpha > 0 needs a teacher")
    rank, world = _rank_world()
    device = resolve_device(recipe.device)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
    per_rank = -(-recipe.batch // world)
    steps = math.ceil(len(sampler) / per_rank)
    key = fingerprint(recipe, student, teacher, steps)
    checkpoint = _resume_point(checkpoints, key)

    model = copy.deepcopy(student).to(device)
    optimizer = _adamw(model, recipe)
    scheduler = schedule(optimizer, recipe, steps)
    history, best = [], _Best()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, best = [Epoch(**e) for e in checkpoint["history"]], _Best(**checkpoint["best"])
    if len(history) < recipe.epochs:
        frozen = _frozen(teacher, device)
        relation = _Relations(recipe.relation, model, frozen) if recipe.relation and frozen is not None else None
        step = _step(_wrapped(model, device), frozen, optimizer, scheduler, recipe, relation)
        model.train()
        try:
            for epoch in range(len(history) + 1, recipe.epochs + 1):
                sampler.set_epoch(epoch)
                loss, throughput, seconds = _train_epoch(step, train_set, sampler, per_rank, recipe, device, epoch)
                score = top1(model, val_set, per_rank) if val_set is not None else None
                history.append(Epoch(epoch, loss, score, throughput, seconds, optimizer.param_groups[0]["lr"]))
                best = _better(best, history[-1], model)
                if checkpoints is not None and is_main():
                    _save(checkpoints, {"fingerprint": key, "student": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "history": [dataclasses.asdict(e) for e in history], "best": vars(best)})
                if is_main():
                    (progress or print_epoch)(history[-1], recipe.epochs, _seconds_left(history, recipe.epochs))
        finally:
            if relation is not None:
                relation.remove()  # the student returned carries no hooks
    if best.state is not None:
        model.load_state_dict(best.state)
    return Result(model.cpu().train(student.training), history, best.epoch)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _sum_over_ranks(device: torch.device, *values: float) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _seed(seed: int, epoch: int, rank: int) -> int:
    """Each epoch's randomness depends on nothing before it, so a resumed run draws what an unbroken one would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _adamw(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, recipe.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def _wrapped(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _frozen(teacher: nn.Module | None, device: torch.device) -> nn.Module | None:
    return copy.deepcopy(teacher).to(device).eval() if teacher is not None else None


def _step(model: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
          recipe: Recipe, relation: _Relations | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    def step(images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            target = logits(teacher(images)) if teacher is not None else None
        loss = distillation_loss(logits(model(images)), target, labels, recipe.alpha, recipe.temperature)
        if relation is not None:
            loss = loss + sum(w * d for w, d in zip(relation.spec.weights, relation.divergences()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach()

    return step


class _Relations:
    """The relation terms of one student and its teacher: forward hooks keep the q/k/v projections'
    outputs of each model's last forward; `divergences()` compares them."""

    def __init__(self, spec: Relation, student: nn.Module, teacher: nn.Module):
        self.spec, self.outputs = spec, ({}, {})
        self.handles = [model.get_submodule(name).register_forward_hook(self._keeper(kept, name))
                        for model, names, kept in ((student, spec.student, self.outputs[0]),
                                                   (teacher, spec.teacher, self.outputs[1])) for name in names]

    @staticmethod
    def _keeper(kept: dict, name: str):
        def keep(module, args, output):
            kept[name] = output
        return keep

    def divergences(self) -> list[Tensor]:
        """KL(teacher ‖ student) of the q, k and v relations, averaged over the batch, from the last forwards."""
        student, teacher = (_relations([self.outputs[i][n] for n in names], dim)
                            for i, (names, dim) in enumerate(((self.spec.student, self.spec.head_dims[0]),
                                                             (self.spec.teacher, self.spec.head_dims[1]))))
        return [F.kl_div(s, t, reduction="batchmean", log_target=True) for s, t in zip(student, teacher)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _relations(outputs: list[Tensor], head_dim: int) -> list[Tensor]:
    """log softmax(X Xᵀ / √head_dim) for X = q, k and v as (B, N, C) tokens: from one fused projection's
    output, cut in three on its features, or from three; a channels-first map (B, C, H, W) read as its
    H·W tokens."""
    tokens = [o.flatten(2).transpose(1, 2) if o.dim() == 4 else o for o in outputs]
    qkv = tokens[0].chunk(3, dim=-1) if len(tokens) == 1 else tokens
    return [F.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) for x in qkv]


def relation_divergences(relation: Relation, student: nn.Module, teacher: nn.Module,
                         images: Tensor) -> list[float]:
    """The q, k and v relation divergences of `student` from `teacher` on `images`, in eval mode."""
    terms = _Relations(relation, student, teacher)
    try:
        with torch.no_grad():
            student(images), teacher(images)
            return [d.item() for d in terms.divergences()]
    finally:
        terms.remove()


RANGE_FALLBACK = 1e-4  # when the range test shows no descent: the usual rate for finetuning a ViT


def lr_range_test(student: nn.Module, teacher: nn.Module | None, train_set: Dataset, recipe: Recipe,
                  steps: int = 100, low: float = 1e-6, high: float = 1.0) -> tuple[float, list[tuple[float, float]]]:
    """A learning rate for `recipe`, from Smith's range test (2015; fastai's lr_find): a copy of the student
    trained for `steps` batches as the rate grows exponentially from `low` to `high`, its loss smoothed
    (bias-corrected moving average, 0.9). The rate where the smoothed loss was least, past the first tenth
    of the steps and before it blew up (4 times the least), over 10, within [1e-5, 1e-2]. When the loss
    never fell 2% below where it was after that first tenth, the trace says nothing and the rate is
    RANGE_FALLBACK. Seeded: the same model and data give the same rate. Returns it and the (rate, smoothed
    loss) trace."""
    device = resolve_device(recipe.device)
    model = copy.deepcopy(student).to(device).train()
    frozen = _frozen(teacher if recipe.alpha > 0 else None, device)
    optimizer = _adamw(model, dataclasses.replace(recipe, lr=low))
    loader = DataLoader(train_set, recipe.batch, shuffle=True, num_workers=recipe.workers,
                        generator=torch.Generator().manual_seed(_seed(recipe.seed, 0, 0)))
    grow = (high / low) ** (1 / max(1, steps - 1))
    trace, average, batches = [], 0.0, iter(())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for i in range(steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            rate = low * grow ** i
            for group in optimizer.param_groups:
                group["lr"] = rate
            with torch.no_grad():
                target = logits(frozen(images)) if frozen is not None else None
            loss = distillation_loss(logits(model(images)), target, labels, recipe.alpha, recipe.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = 0.9 * average + 0.1 * loss.item()
            smoothed = average / (1 - 0.9 ** (i + 1))
            trace.append((rate, smoothed))
            if not math.isfinite(smoothed) or smoothed > 4 * min(t[1] for t in trace):
                break
    chosen = _least_loss_rate(trace, skip=steps // 10)
    if dist.is_initialized():  # every rank trains at rank 0's rate
        shared = torch.tensor([chosen], dtype=torch.float64, device=device)
        dist.broadcast(shared, 0)
        chosen = shared.item()
    return chosen, trace


def _least_loss_rate(trace: list[tuple[float, float]], skip: int) -> float:
    usable = [t for t in trace[skip:] if math.isfinite(t[1])]
    if not usable:
        return RANGE_FALLBACK
    loss, rate = min((smoothed, rate) for rate, smoothed in usable)
    if loss > 0.98 * usable[0][1]:
        return RANGE_FALLBACK
    return min(1e-2, max(1e-5, rate / 10))


def _train_epoch(step: Callable[[Tensor, Tensor], Tensor], train_set: Dataset, sampler: DistributedSampler,
                 per_rank: int, recipe: Recipe, device: torch.device, epoch: int) -> tuple[float, float, float]:
    """(mean loss, samples/s, seconds), over all ranks."""
    seed = _seed(recipe.seed, epoch, _rank_world()[0])
    loader = DataLoader(train_set, per_rank, sampler=sampler, num_workers=recipe.workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    total, seen, start = torch.zeros((), device=device), 0, time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout and the like draw from a seeded copy of the caller's RNG
        torch.manual_seed(seed)
        for images, labels in loader:
            loss = step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            total += loss * len(labels)
            seen += len(labels)
    total, seen, seconds = _sum_over_ranks(device, total.item(), seen, time.perf_counter() - start)
    seconds /= _rank_world()[1]
    return total / seen, seen / seconds, seconds


def _better(best: _Best, record: Epoch, model: nn.Module) -> _Best:
    if record.top1 is None:
        return _Best(record.epoch)
    if record.top1 > best.top1:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return _Best(record.epoch, record.top1, state)
    return best


def _seconds_left(history: list[Epoch], epochs: int) -> float:
    return sum(e.seconds for e in history) / len(history) * (epochs - history[-1].epoch)


def _resume_point(folder: Path | None, key: str) -> dict | None:
    """Rank 0 reads the checkpoint and hands it to the others, so they need not see the folder."""
    checkpoint = _load(folder, key) if folder is not None and is_main() else None
    if dist.is_initialized():
        shared = [checkpoint]
        dist.broadcast_object_list(shared, src=0)
        checkpoint = shared[0]
    return checkpoint


def _load(folder: Path, key: str) -> dict | None:
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable, say by another torch: training again is the cache's answer, not an error
        return None
    return checkpoint if checkpoint.get("fingerprint") == key else None


def _save(folder: Path, checkpoint: dict) -> None:
    """Written beside its final name and renamed over it, so a killed run leaves the previous epoch's whole."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(checkpoint, file)
        os.replace(tmp, folder / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
