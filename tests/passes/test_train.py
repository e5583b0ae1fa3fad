import io
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from evc.passes.train import (
    CHECKPOINT,
    Epoch,
    Recipe,
    distill,
    distillation_loss,
    logits,
    print_epoch,
    schedule,
    top1,
    top_k,
)
from tests.conftest import ROOT

# Small enough that an epoch is a few milliseconds; large enough that learning shows.
FAST = Recipe(epochs=2, lr=1e-2, batch=32, warmup_epochs=0.25, alpha=1.0, temperature=2.0, device="cpu")


def blobs(n: int = 256, seed: int = 0, classes: int = 4) -> TensorDataset:
    """Four Gaussian clusters of 3×4×4 'images'; every set shares the centres, so each is the same task."""
    centres = torch.randn(classes, 3, 4, 4, generator=torch.Generator().manual_seed(99))
    draw = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=draw)
    return TensorDataset(centres[labels] + torch.randn(n, 3, 4, 4, generator=draw), labels)


def mlp(seed: int, hidden: int = 32, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(48, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 4))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def agreement(a: nn.Module, b: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        return (a(data.tensors[0]).argmax(-1) == b(data.tensors[0]).argmax(-1)).float().mean().item()


def kl(teacher: nn.Module, student: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        t, s = teacher(data.tensors[0]), student(data.tensors[0])
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True).item()


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """A teacher trained on the labels by cross-entropy alone."""
    recipe = replace(FAST, epochs=4, alpha=0.0)
    return distill(mlp(seed=1), None, blobs(), recipe, progress=quiet).student.eval()


def test_the_loss_mixes_cross_entropy_and_scaled_kl_by_alpha():
    student, teacher, labels = torch.randn(8, 4), torch.randn(8, 4), torch.randint(4, (8,))
    ce = F.cross_entropy(student, labels)
    kl_t2 = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.0, 2.0), ce)
    assert torch.allclose(distillation_loss(student, teacher, labels, 1.0, 2.0), kl_t2)
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.25, 2.0), 0.25 * kl_t2 + 0.75 * ce)
    assert distillation_loss(teacher, teacher, labels, 1.0, 2.0).abs() < 1e-6
    each = distillation_loss(student, teacher, labels, 0.25, 2.0, per_image=True)  # how a budget judges images
    assert each.shape == (8,) and torch.allclose(each.mean(), 0.25 * kl_t2 + 0.75 * ce)
    alone = distillation_loss(student[3:4], teacher[3:4], labels[3:4], 0.25, 2.0)
    assert torch.allclose(each[3], alone)


def test_a_distilled_deits_two_heads_are_averaged():
    cls, dist = torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, 5.0]])
    assert torch.equal(logits((cls, dist)), torch.tensor([[2.0, 4.0]]))
    assert logits(cls) is cls


def test_distillation_brings_a_differently_initialised_student_to_its_teacher(teacher):
    student, held_out = mlp(seed=2).eval(), blobs(512, seed=1)
    before = weights(student)
    agreed, diverged = agreement(student, teacher, held_out), kl(teacher, student, held_out)

    result = distill(student, teacher, blobs(), replace(FAST, epochs=4), progress=quiet)

    assert agreed < 0.6 and agreement(result.student, teacher, held_out) > 0.95
    assert kl(teacher, result.student, held_out) < diverged / 10
    assert result.history[-1].loss < result.history[0].loss / 2
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the caller's copy is untouched
    assert not result.student.training  # returned in the mode it came in


def test_with_alpha_one_the_labels_are_not_read(teacher):
    data = blobs()
    wrong = TensorDataset(data.tensors[0], torch.randperm(len(data), generator=torch.Generator().manual_seed(0)) % 4)
    right_run = distill(mlp(seed=2), teacher, data, FAST, progress=quiet)
    wrong_run = distill(mlp(seed=2), teacher, wrong, FAST, progress=quiet)
    assert_same_weights(right_run.student, wrong_run.student)


def test_with_alpha_zero_the_teacher_is_not_consulted(teacher):
    recipe = replace(FAST, alpha=0.0)
    with_teacher = distill(mlp(seed=2), teacher, blobs(), recipe, progress=quiet)
    with_another = distill(mlp(seed=2), mlp(seed=5), blobs(), recipe, progress=quiet)
    assert_same_weights(with_teacher.student, with_another.student)
    assert top1(with_teacher.student, blobs(256, seed=1)) > 0.9  # cross-entropy on the labels learnt the task


def test_alpha_above_zero_needs_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        distill(mlp(seed=2), None, blobs(), FAST, progress=quiet)


def lrs_of(recipe: Recipe, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    lr_schedule = schedule(optimizer, recipe, steps_per_epoch)
    seen = []
    for _ in range(recipe.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_schedule.step()
    return seen


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine():
    lrs = lrs_of(Recipe(epochs=3, lr=1.0, warmup_epochs=1), steps_per_epoch=4)
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs[4:] == pytest.approx(cosine)
    assert lrs[-1] > 0  # the last step still learns


def test_warm_up_is_at_most_half_the_run():
    lrs = lrs_of(Recipe(epochs=2, lr=1.0, warmup_epochs=5), steps_per_epoch=5)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 5


def test_no_warm_up_starts_the_cosine_at_once():
    assert lrs_of(Recipe(epochs=1, lr=1.0, warmup_epochs=0), steps_per_epoch=4)[0] == 1.0


def test_the_schedule_is_stepped_every_iteration():
    result = distill(mlp(seed=2), None, blobs(), replace(FAST, alpha=0.0), progress=quiet)
    lrs = lrs_of(replace(FAST, alpha=0.0), steps_per_epoch=256 // 32) + [0.0]
    assert [e.lr for e in result.history] == pytest.approx([lrs[8], lrs[16]])


def forgets_after_epoch_one(train: TensorDataset):
    """A progress hook that shifts the training labels after epoch 1, so later epochs learn the wrong task."""

    def hook(record: Epoch, epochs: int, seconds_left: float):
        if record.epoch == 1:
            train.tensors[1][:] = (train.tensors[1] + 1) % 4

    return hook


def forgetting_run(validate: bool):
    train, val = blobs(), blobs(256, seed=1)
    result = distill(mlp(seed=2), None, train, replace(FAST, epochs=3, alpha=0.0), val_set=val if validate else None,
                     progress=forgets_after_epoch_one(train))
    return result, top1(result.student, val)


def test_the_best_validated_epoch_is_returned():
    result, score = forgetting_run(validate=True)
    first, last = result.history[0].top1, result.history[-1].top1
    assert result.best == 1 and first > 0.9 and last < first - 0.1
    assert score == first


def test_without_validation_the_last_epoch_is_returned():
    result, score = forgetting_run(validate=False)
    validated, _ = forgetting_run(validate=True)
    assert result.best == 3 and result.history[-1].top1 is None
    assert score == validated.history[-1].top1


def test_top_k_counts_a_hit_among_the_k_highest():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [1.0, 3.0, 2.0]])
    data = TensorDataset(torch.arange(4), torch.tensor([0, 1, 2, 2]))
    model = Lookup(scores)
    assert top1(model, data, batch=3) == 0.25
    assert top_k(model, data, batch=3, k=2) == 0.75


class Lookup(nn.Module):
    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = nn.Parameter(scores)

    def forward(self, index):
        return self.scores[index]


class Interrupt:
    """A progress hook that stops the run after a given epoch, as Ctrl-C would."""

    def __init__(self, after: int):
        self.after, self.seen = after, []

    def __call__(self, record: Epoch, epochs: int, seconds_left: float):
        self.seen.append(record.epoch)
        if record.epoch == self.after:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_after_its_last_epoch_to_the_same_weights(tmp_path, teacher):
    recipe, val = replace(FAST, alpha=0.5), blobs(128, seed=1)
    student = mlp(seed=2, dropout=0.2)  # so the resumed epoch must draw the masks the unbroken one drew
    unbroken = distill(student, teacher, blobs(), recipe, val_set=val, progress=quiet)

    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, blobs(), recipe, tmp_path, val_set=val, progress=Interrupt(after=1))
    resumed_progress = Interrupt(after=0)
    resumed = distill(student, teacher, blobs(), recipe, tmp_path, val_set=val, progress=resumed_progress)

    assert resumed_progress.seen == [2]
    assert_same_weights(resumed.student, unbroken.student)
    assert [(e.loss, e.top1, e.lr) for e in resumed.history] == [(e.loss, e.top1, e.lr) for e in unbroken.history]
    assert resumed.best == unbroken.best
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind


class Untouchable(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, index):
        raise AssertionError("a finished run read its data again")


def test_a_finished_run_returns_from_its_checkpoint_without_training(tmp_path):
    recipe = replace(FAST, alpha=0.0)
    first = distill(mlp(seed=2), None, blobs(), recipe, tmp_path, progress=quiet)
    again = distill(mlp(seed=2), None, Untouchable(), recipe, tmp_path, progress=Interrupt(after=1))
    assert_same_weights(again.student, first.student)
    assert again.history == first.history and again.best == first.best


@pytest.mark.parametrize("changed", ["recipe", "architecture", "starting weights"])
def test_a_checkpoint_from_other_inputs_is_ignored(tmp_path, changed):
    recipe = replace(FAST, epochs=1, alpha=0.0)
    distill(mlp(seed=2), None, blobs(), recipe, tmp_path, progress=quiet)
    other_recipe = replace(recipe, lr=1e-3) if changed == "recipe" else recipe
    other_student = {"architecture": mlp(seed=2, hidden=16), "starting weights": mlp(seed=3)}.get(changed, mlp(seed=2))

    progress = Interrupt(after=0)
    result = distill(other_student, None, blobs(), other_recipe, tmp_path, progress=progress)

    assert progress.seen == [1]
    fresh = distill(other_student, None, blobs(), other_recipe, progress=quiet)
    assert_same_weights(result.student, fresh.student)


def test_an_epoch_prints_as_one_line():
    console = Console(file=io.StringIO(), width=40)
    print_epoch(Epoch(2, 0.12345, 0.875, 1234.5, 10.0, 1e-4), 3, 65.0, console)
    assert console.file.getvalue() == "epoch 2/3  loss 0.1235  top-1 87.50%  1,234 samples/s  0:01:05 left\n"


def test_progress_goes_to_stderr_by_default(capsys):
    distill(mlp(seed=2), None, blobs(), replace(FAST, alpha=0.0))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]


# Each rank trains on its half of every global batch, then calls again to check the finished run's
# checkpoint reaches rank 1 (whose own folder stays empty) from rank 0.
DISTRIBUTED = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from evc.passes.train import distill, init_distributed
from tests.passes.test_train import FAST, blobs, mlp

out = Path(sys.argv[1])
rank, world = init_distributed("cpu")
folder = out / f"rank{rank}"
student = mlp(seed=rank)  # the ranks start apart; DistributedDataParallel starts them all from rank 0's weights
result = distill(student, mlp(seed=7), blobs(), FAST, folder)
again = distill(student, mlp(seed=7), blobs(), FAST, folder, progress=lambda *_: sys.exit("trained twice"))
torch.save({"first": result.student.state_dict(), "again": again.student.state_dict(),
            "loss": [e.loss for e in result.history], "world": world}, out / f"rank{rank}.pt")
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_with_their_global_batch(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(DISTRIBUTED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for name, tensor in ranks[0]["first"].items():
        assert torch.equal(tensor, ranks[1]["first"][name])
        assert torch.equal(tensor, ranks[1]["again"][name])
    assert (tmp_path / "rank0" / CHECKPOINT).is_file() and not (tmp_path / "rank1").exists()
    assert run.stderr.count("epoch 1/2") == 1  # only rank 0 reports

    alone = distill(mlp(seed=0), mlp(seed=7), blobs(), FAST, progress=quiet)
    for name, tensor in alone.student.state_dict().items():
        assert torch.allclose(tensor, ranks[0]["first"][name], atol=1e-5), name
    assert [e.loss for e in alone.history] == pytest.approx(ranks[0]["loss"], rel=1e-5)


def test_the_range_test_picks_a_tenth_of_the_least_loss_rate_and_repeats_itself():
    from evc.passes.train import lr_range_test

    recipe = replace(FAST, alpha=0.0)
    rate, trace = lr_range_test(mlp(seed=3), None, blobs(), recipe)
    again, _ = lr_range_test(mlp(seed=3), None, blobs(), recipe)
    assert rate == again and 1e-5 <= rate <= 1e-2
    rates, losses = zip(*trace)
    assert all(b > a for a, b in zip(rates, rates[1:])) and rates[0] == pytest.approx(1e-6)
    assert min(losses) < losses[0]  # the loss fell as the rate grew
    best = min(range(10, len(trace)), key=lambda i: losses[i])  # past the first tenth of the 100 steps
    assert rate == pytest.approx(min(1e-2, max(1e-5, rates[best] / 10)))
    trained = distill(mlp(seed=3), None, blobs(), replace(recipe, lr=rate), progress=quiet).student
    assert top1(trained, blobs(seed=7)) > 0.9
