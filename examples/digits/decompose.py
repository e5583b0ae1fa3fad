"""The digits ViT decomposed into 2 and into 4 parts (DeViT), served over loopback: the table.

    python examples/digits/prepare.py        # data/ and digits_vit.safetensors, once
    python examples/digits/decompose.py      # ~4 min on a 2-core laptop

For each part count it builds decompose.evc (parts = 2, then 4) into
build/parts<N>/, then, on the 359 validation images: top-1 of the model as
trained, of each part alone (the fusion with every other part missing), of
the fused ensemble, and of the ensemble with each part missing; MACs per
part; and, with every part served by `evc serve` in a process of its own on
127.0.0.1, the end-to-end latency of `evc infer`'s coordinator per image and
the bytes each part receives and sends per image.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from evc.driver import build
from evc.runtime.collab.coordinator import Coordinator
from evc.runtime.collab.runtime import local_infer
from evc.spec.check import parse_and_check

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prepare import read_folder  # noqa: E402  (this folder's own script)


def built(parts: int) -> tuple[Path, dict]:
    text = (HERE / "decompose.evc").read_text().replace("parts = 2,", f"parts = {parts},")
    (result,) = build(parse_and_check(text, HERE / "decompose.evc"), HERE / "build" / f"parts{parts}")
    return result.bundle, result.manifest


def served(bundle: Path, parts: int) -> tuple[list[subprocess.Popen], list[str]]:
    """Every part in an `evc serve` process of its own on a free loopback port."""
    processes = [subprocess.Popen([sys.executable, "-m", "evc", "serve", str(bundle), "--part", str(k),
                                   "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, text=True)
                 for k in range(parts)]
    peers = []
    for process in processes:
        line = process.stdout.readline()  # "serving part K of BUNDLE on HOST:PORT", once loaded
        if not line.startswith("serving part"):
            for p in processes:
                p.kill()
            raise SystemExit(f"evc serve did not start: {line!r}")
        peers.append(line.split()[-1])
    return processes, peers


def latency_ms(bundle: Path, peers: list[str], images: np.ndarray, runs: int = 100) -> float:
    with Coordinator(bundle, peers) as coordinator:
        for image in images[:10]:
            coordinator.infer(image[None])
        times = []
        for image in images[:runs]:
            start = time.perf_counter()
            coordinator.infer(image[None])
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rows(parts: int, x: np.ndarray, y: np.ndarray) -> list[str]:
    bundle, manifest = built(parts)

    def top1(missing=()):
        return f"{(local_infer(bundle, x, tuple(missing)).argmax(-1) == y).mean():.2%}"

    decomposition = manifest["decomposition"]
    total = manifest["params_macs"]["after"]["total"]["macs"]
    original = manifest["evaluation"]["original"]
    processes, peers = served(bundle, parts)
    try:
        ms = latency_ms(bundle, peers, x)
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    out = [f"| {parts} parts: original | {original['top1']:.2%} | {original['macs'] / 1e6:.1f} M | | |",
           f"| {parts} parts: fused | {top1()} | {total / 1e6:.1f} M (all parts and fusion) | {ms:.2f} | |"]
    for k, part in enumerate(decomposition["parts"]):
        alone = [i for i in range(parts) if i != k]
        bytes_ = part["bytes_per_image"]
        out += [f"| {part['name']} alone (classes {part['classes']}) | {top1(alone)} | {part['macs'] / 1e6:.1f} M "
                f"| | {bytes_['request']} / {bytes_['reply']} |",
                f"| fused without {part['name']} | {top1([k])} | | | |"]
    return out


def main() -> None:
    x, y = (a.numpy() for a in read_folder(HERE / "data" / "val"))
    table = ["| model | top-1 (val) | MACs | evc infer over loopback (ms per image) | bytes per image: in / out |",
             "|---|---|---|---|---|"]
    for parts in (2, 4):
        table += rows(parts, x, y)
    print("\n".join(table))


if __name__ == "__main__":
    main()
