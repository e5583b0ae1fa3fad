"""Artifacts run on another x86 CPU than this one: qemu-user emulating it, with the runtime picking the
kernels that CPU gets. `Haswell` is AVX2 and FMA with no AVX-512 and no VNNI, the oldest CPU the tests
care about; this machine may have all of them.

    here, haswell = logits_on(None, "onnx", models, images, tmp), logits_on("Haswell", "onnx", models, images, tmp)
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-user (Debian's, in the README's test command) emulates "
                                                     "the CPU")
# The format's own runner, as `evc build` checks parity with it.
RUN = """
import sys, numpy as np
from pathlib import Path
from evc.registry import FORMATS, load_plugins
load_plugins()
images, out, fmt, *models = sys.argv[1:]
runner = FORMATS[fmt].plugin
np.save(out, np.stack([runner.run(Path(model), np.load(images)) for model in models]))
"""


def logits_on(cpu: str | None, fmt: str, models, images: np.ndarray, tmp_path) -> np.ndarray:
    """Each model's logits on `images`, stacked: run here (cpu None), or on the emulated `cpu`."""
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / f"logits-{fmt}-{cpu or 'here'}.npy"
    emulate = [QEMU, "-cpu", cpu] if cpu else []
    done = subprocess.run([*emulate, sys.executable, "-c", RUN, tmp_path / "images.npy", out, fmt, *map(str, models)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out)


def has_vnni() -> bool:
    flags = open("/proc/cpuinfo").read().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags
