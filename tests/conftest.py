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
