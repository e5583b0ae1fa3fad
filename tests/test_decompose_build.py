"""A decomposed model built end to end: N + 1 models lowered and checked, then served on loopback."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from evc.runtime.collab.runtime import local_infer
from tests.conftest import ROOT, SMALL_MODEL, run_evc

SPEC = """evc 1
model tiny {{
    source = {model}
    input  = image(32, 32, crop_pct = 1.0)
}}
data train {{ images = "data/train" }}
compress {{
    decompose {{ parts = 2, keep = 1/2, score = l1, data = train }}
    ffn_prune {{ keep = 50%, round_to = 8 }}
}}
target cpu   {{ device = cpu, format = onnx, runs = 3, warmups = 1, peers = {peers} }}
target phone {{ device = android, format = tflite }}
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decompose")
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    import prepare

    prepare.write_folders(folder / "data")
    peers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    (folder / "tiny.evc").write_text(SPEC.format(model=SMALL_MODEL, peers=json.dumps(peers)))
    done = run_evc("build", folder / "tiny.evc", "--out", folder / "out")
    assert done.returncode == 0, done.stderr
    return folder / "out" / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("target, suffix", [("cpu", "onnx"), ("phone", "tflite")])
def test_every_part_and_the_fused_whole_match_pytorch(bundle, target, suffix):
    manifest = json.loads((bundle / target / "manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == [f"part0/model.{suffix}", f"part1/model.{suffix}"]
    assert all(a["parity"]["max_abs_diff"] < 1e-4 for a in manifest["artifacts"])
    whole = manifest["validation"]["whole"]  # fusion.onnx on the lowered parts against the PyTorch ensemble
    assert whole["max_abs_diff"] < 1e-4 and whole["top1_agreement"] == 1.0
    collab = json.loads((bundle / target / "collab.json").read_text())
    assert [p["model"] for p in collab["parts"]] == [a["path"] for a in manifest["artifacts"]]
    assert collab["fusion"] == {"model": "fusion.onnx", "degraded_ok": True}


@pytest.mark.slow
def test_the_manifest_records_each_parts_classes_costs_and_traffic(bundle):
    manifest = json.loads((bundle / "cpu" / "manifest.json").read_text())
    parts = manifest["decomposition"]["parts"]
    assert sorted(c for p in parts for c in p["classes"]) == list(range(10))
    for part in parts:
        assert part["bytes_per_image"] == {"request": 4 * 3 * 32 * 32, "request_pixels": 3 * 32 * 32,
                                           "reply": 4 * part["width"]}
        assert part["macs"] < manifest["params_macs"]["before"]["total"]["macs"]
        heads = [b["attn"]["num_heads"] for b in part["structure"]["blocks"]]
        hidden = [b["mlp"]["hidden"] for b in part["structure"]["blocks"]]
        assert heads == [2, 2] and hidden == [192, 192]  # 3 heads kept 1/2 (round(1.5)); 768 units: 1/2, then 1/2
    after = manifest["params_macs"]["after"]
    assert after["total"]["macs"] == sum(p["macs"] for p in parts) + manifest["decomposition"]["fusion"]["macs"]


@pytest.mark.slow
def test_parts_served_where_the_spec_placed_them_answer_as_the_bundle_does_in_process(bundle, tmp_path):
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    placed = json.loads((bundle / "cpu" / "collab.json").read_text())["peers"]
    manifest = json.loads((bundle / "cpu" / "manifest.json").read_text())
    assert [p["peer"] for p in manifest["decomposition"]["parts"]] == placed
    servers = [subprocess.Popen([sys.executable, "-m", "evc", "serve", str(bundle / "cpu"), "--part", str(k),
                                 "--port", peer.rpartition(":")[2]], stdout=subprocess.PIPE, text=True)
               for k, peer in enumerate(placed)]
    try:
        peers = [server.stdout.readline().split()[-1] for server in servers]  # "serving part K of B on HOST:PORT"
        assert peers == placed
        # no --peers: collab.json's placement; a deadline no loaded CI machine misses (a late part degrades)
        done = run_evc("infer", bundle / "cpu", tmp_path / "images.npy", "--json", "--deadline-ms", 30000,
                       timeout=120)
        assert done.returncode == 0, done.stderr
        answers = json.loads(done.stdout)
        assert [a["class"] for a in answers] == local_infer(bundle / "cpu", images).argmax(-1).tolist()
        assert not any(a["degraded"] for a in answers)
        servers[1].kill()
        servers[1].wait(10)
        done = run_evc("infer", bundle / "cpu", "--peers", ",".join(peers), tmp_path / "images.npy", "--json",
                       "--deadline-ms", 30000, timeout=120)
        answers = json.loads(done.stdout)
        assert done.returncode == 0 and all(a["degraded"] for a in answers)
        assert [a["class"] for a in answers] == local_infer(bundle / "cpu", images, missing=(1,)).argmax(-1).tolist()
    finally:
        for server in servers:
            server.kill()
            server.wait(10)


@pytest.mark.slow
def test_explain_shows_each_part_and_the_fusion(bundle):
    done = run_evc("explain", bundle.parent.parent / "tiny.evc")
    assert done.returncode == 0, done.stderr
    assert "decomposed into 2 parts (DeViT):" in done.stdout
    assert "part1: classes" in done.stdout and "sends 192 floats per image" in done.stdout
    assert "fusion: one Linear, 386 in (the parts' features and a flag each), 10 out" in done.stdout


@pytest.mark.slow
def test_peers_that_do_not_match_the_parts_are_a_spec_error_at_the_key(bundle):
    spec = bundle.parent.parent / "wrong_peers.evc"
    text = (bundle.parent.parent / "tiny.evc").read_text()
    spec.write_text(text.replace("target phone { device = android, format = tflite }",
                                 'target phone { device = android, format = tflite, peers = ["10.0.0.2:50051"] }'))
    done = run_evc("build", spec, "--out", bundle.parent.parent / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "wrong_peers.evc:12:" in done.stderr and "target 'phone': peers: 1 given for 2 parts" in done.stderr
    assert not (bundle.parent.parent / "out" / "wrong_peers" / "phone").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu", "phone"])
def test_the_bundles_readme_says_how_to_run_the_parts_together(bundle, target):
    readme = (bundle / target / "README.md").read_text()
    assert "## The parts, run together" in readme and "decomposed into 2 parts" in readme
    assert "evc serve . --part K" in readme and "flagged degraded" in readme
    placed = json.loads((bundle / "cpu" / "collab.json").read_text())["peers"]
    assert all(peer in readme for peer in placed) if target == "cpu" else "not placed" in readme


BOARDS = """evc 1
model tiny {{
    source = {model}
    input  = image(32, 32, crop_pct = 1.0)
}}
data train {{ images = "data/train" }}
compress {{
    decompose {{ parts = 2, keep = 1/2, score = l1, data = train }}
}}
target x5   {{ device = rdk_x5, format = bpu, calibrate = train }}
target orin {{ device = jetson, format = onnx }}
"""


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    """The same model decomposed for the X5's BPU toolchain and for a Jetson's TensorRT."""
    folder = tmp_path_factory.mktemp("boards")
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    import prepare

    prepare.write_folders(folder / "data")
    (folder / "tiny.evc").write_text(BOARDS.format(model=SMALL_MODEL))
    done = run_evc("build", folder / "tiny.evc", "--out", folder / "out")
    assert done.returncode == 0, done.stderr
    return folder / "out" / "tiny"


@pytest.mark.slow
def test_every_part_is_lowered_for_the_bpu_toolchain_and_checked(boards):
    bundle = boards / "x5"
    manifest = json.loads((bundle / "manifest.json").read_text())
    paths = [a["path"] for a in manifest["artifacts"]]
    assert paths == ["part0/model.onnx", "part0/model_int8_proxy.onnx", "part1/model.onnx",
                     "part1/model_int8_proxy.onnx"]
    for part in ("part0", "part1"):
        for name in ("config.yaml", "op_check.json", "calibration"):
            assert (bundle / part / name).exists(), f"{part}/{name}"
        check = json.loads((bundle / part / "op_check.json").read_text())
        assert check["summary"]["unsupported"] == 0
    onnx = [a for a in manifest["artifacts"] if "toolchain" in a]
    assert all(a["parity"]["max_abs_diff"] < 1e-4 for a in onnx)
    assert manifest["validation"]["whole"]["max_abs_diff"] < 1e-4  # the fused float parts against PyTorch
    collab = json.loads((bundle / "collab.json").read_text())
    assert [p["model"] for p in collab["parts"]] == ["part0/model.onnx", "part1/model.onnx"]
    assert [p["model"] for p in manifest["decomposition"]["parts"]] == ["part0/model.onnx", "part1/model.onnx"]
    assert manifest["decomposition"]["same_shapes"]


@pytest.mark.slow
def test_build_sh_compiles_every_part_in_its_own_folder(boards, tmp_path):
    bundle = boards / "x5"
    assert subprocess.run(["shellcheck", bundle / "build.sh", bundle / "bench.sh"]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "hb_mapper"  # the toolchain runs on the user's PC, not here: it records its calls
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "${PWD##*/}" "$1" >> "$CALLS"\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls)}
    done = subprocess.run(["bash", bundle / "build.sh"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["part0", "checker", "part0", "makertbin",
                                         "part1", "checker", "part1", "makertbin"]
    readme = (bundle / "README.md").read_text()
    assert "`part0/config.yaml`" in readme and "compiles every part" in readme


@pytest.mark.slow
def test_a_jetson_target_lowers_every_part_to_onnx(boards):
    manifest = json.loads((boards / "orin" / "manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == ["part0/model.onnx", "part1/model.onnx"]
    assert manifest["validation"]["whole"]["max_abs_diff"] < 1e-4
    assert "MODEL=part0/model.onnx" in (boards / "orin" / "bench.sh").read_text()
