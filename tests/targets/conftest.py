"""What the target tests share: a phone's adb stand-in, the tests' own adb server, a model no exporter takes, a
narrowed hierarchical model."""

import os
import subprocess

import pytest

ADB_PORT = "5137"  # not adb's default 5037: the tests start and kill their own server

# EfficientFormer-L1 narrowed, one block a stage: three stages of conv blocks on maps (pooling mixers, 1x1 conv
# MLPs, batch norm), then the last stage's map flattened to tokens for one attention block; its bias is made
# for 224 px.
EFFICIENTFORMER = ('timm("efficientformer_l1", depths = [1, 1, 1, 1], embed_dims = [16, 16, 32, 32], num_vit = 1, '
                   "num_classes = 10)")


@pytest.fixture
def adb_port(monkeypatch):
    """adb and adbutils on a port of the tests' own; the server is killed afterwards."""
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", ADB_PORT)
    yield
    subprocess.run(["adb", "kill-server"], capture_output=True)


def stand_in_adb(folder, tool: str, output: str) -> tuple[dict, object]:
    """No phone can be attached here, so an adb in `folder`/bin stands in for one: it records what a bench
    script asks of it and answers a run of `tool` with `output`, the real tool's. (the environment that puts
    it first on PATH, the log of its calls)."""
    (folder / "bin").mkdir()
    adb = folder / "bin" / "adb"
    adb.write_text(f"""#!/bin/bash
echo "$@" >> "$ADB_LOG"
case "$*" in
    *get-state*) echo device ;;
    *{tool}\\ --*) cat <<'EOF'
{output}EOF
    ;;
esac
""")
    adb.chmod(0o755)
    log = folder / "adb.log"
    return {"PATH": f"{folder / 'bin'}:{os.environ['PATH']}", "ADB_LOG": str(log)}, log


def median_head_spec(folder, target: str) -> str:
    """A spec of one target on a model whose median (torch.median) no exporter here lowers; the model's module
    is written beside it."""
    (folder / "median_head.py").write_text(
        "from torch import nn\n"
        "class MedianHead(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 10, 4, stride=4)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).flatten(2).median(-1).values\n")
    return ('evc 1\nmodel m {\n    source = python("median_head:MedianHead")\n    input = image(32, 32)\n}\n'
            f"{target}\n")


def explained_placements(bundle) -> dict:
    """`evc explain --json` on the spec a build fixture wrote `bundle` from (three folders up), which must read
    the lowering the build cached: each target's placement, by target name."""
    import json

    from tests.conftest import run_evc

    spec = bundle.parent.parent.parent / "spec.evc"
    done = run_evc("explain", spec, "--out", spec.parent / "out", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["cached"]  # read from the lowering the build cached, not lowered again
    return {t["name"]: t["placement"] for t in record["targets"]}
