import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture
def registered_pass():
    """Register a pass for one test: `registered_pass("name", run, *params, check=None, excludes=None)`."""
    from evc.registry import PASSES, Pass, load_plugins, register_pass

    load_plugins()
    added = []

    def register(name, run, *params, check=None, excludes=None):
        plugin = type(name, (Pass,), {"run": lambda self, program, params, ctx: run(program, params, ctx),
                                      "__doc__": run.__doc__})
        register_pass(name, *params, check=check, excludes=excludes)(plugin)
        added.append(name)

    yield register
    for name in added:
        PASSES.pop(name, None)


def run_evc(*args, cwd=None, timeout=600):
    """Run the real CLI in a fresh process, as a user would."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "evc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


# A two-block ViT at 32x32: the whole pipeline in a couple of seconds.
SMALL_MODEL = 'timm("vit_tiny_patch16_224", img_size = 32, patch_size = 8, depth = 2, num_classes = 10)'


def small_spec(targets: str = "target cpu { device = cpu, format = onnx, runs = 3, warmups = 1 }",
               model_extra: str = "", extra: str = "") -> str:
    return (f"evc 1\nmodel small {{\n    source = {SMALL_MODEL}\n    input = image(32, 32)\n{model_extra}}}\n"
            f"{extra}{targets}\n")


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec into a fresh folder: `write_spec(text, name="small.evc") -> Path`."""

    def write(text: str, name: str = "small.evc") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as class folders (train, val), at 32×32: a real task a small ViT learns in seconds."""
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare.write_folders(root)
    return root


def write_images(folder: Path, count: int, height: int = 32, width: int = 32, seed: int = 0) -> Path:
    """A folder of `count` random RGB PNG images."""
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{seed}_{i}.png")
    return folder


def check_fails(spec: Path) -> str:
    """`evc check` on a spec that must be rejected as bad input: exit 2, no traceback. Returns stderr."""
    done = run_evc("check", spec)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def put_checkpoint(cache, repo: str, commit: str, name: str, model) -> None:
    """`model`'s state dict as `name` of `repo` at `commit`, now its main: a blob, a snapshot link, a ref,
    laid out as huggingface_hub's cache lays them out."""
    import torch
    from safetensors.torch import save_file

    from evc.keys import file_digest

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    staged = folder / "blobs" / "incoming"
    if name.endswith(".safetensors"):
        save_file(model.state_dict(), str(staged))
    else:
        torch.save(model.state_dict(), staged)
    blob = staged.rename(folder / "blobs" / file_digest(staged))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache, offline, for this process and the `evc` processes it starts: the
    Hub cannot be reached from the tests, so they lay out what it would have fetched (`put_checkpoint`)."""
    from huggingface_hub import constants

    from evc.model.hub import fetch

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fetch.cache_clear()
    yield cache
    fetch.cache_clear()
