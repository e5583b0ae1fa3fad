"""finetune's defaults as a new user meets them: the digits ViT pruned by half, finetuned with data and epochs alone.

    .venv/bin/python examples/digits/prepare.py           # data/ and digits_vit.safetensors, once
    .venv/bin/python benchmarks/finetune_defaults.py      # about 5 minutes on 2 cores

The digits ViT (examples/digits: 6 blocks of 3 heads, width 96, MLP 384,
32×32) with head_prune and ffn_prune at keep 1/2 by Taylor scores on train,
then `finetune { data = train, epochs = 6 }` three ways:

    before          the defaults before this script's issue: lr = 1e-4, augment = standard
    auto            today's defaults: lr = auto (a range test), augment = auto
    hand-tuned      lr = 1e-3, augment = none: what the issue found by hand

Top-1 on the 359 validation images, from the build's evaluate block.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

WAYS = {
    "before (lr = 1e-4, augment = standard)": "lr = 1e-4, augment = standard",
    "auto (the defaults)": "",
    "hand-tuned (lr = 1e-3, augment = none)": "lr = 1e-3, augment = none",
}


def build(extra: str, out: Path) -> dict:
    text = (DIGITS / "digits.evc").read_text()
    finetune = "finetune   { data = train, epochs = 6" + (f", {extra}" if extra else "") + " }"
    compress = ("compress {\n    head_prune { keep = 1/2, score = taylor, data = train }\n"
                "    ffn_prune  { keep = 1/2, score = taylor, data = train }\n    " + finetune + "\n}\n")
    text = re.sub(r"compress \{.*?\n\}\n", compress, text, flags=re.S)
    text = re.sub(r"\ntarget phone \{.*?\n\}\n", "\n", text, flags=re.S)
    path = DIGITS / ".bench_finetune.evc"
    path.write_text(text)
    try:
        done = subprocess.run([sys.executable, "-m", "evc", "build", str(path), "--out", str(out)],
                              capture_output=True, text=True)
    finally:
        path.unlink()
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads((out / ".bench_finetune" / "cpu" / "manifest.json").read_text())


def main() -> None:
    if not (DIGITS / "digits_vit.safetensors").exists():
        raise SystemExit("run examples/digits/prepare.py first")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, extra) in enumerate(WAYS.items()):
            manifest = build(extra, Path(folder) / str(i))
            finetune = manifest["passes"][2]["found"]
            rows.append((name, manifest["evaluation"], finetune["chosen"]))
    original = rows[0][1]["original"]["top1"]
    print(f"model as trained: {100 * original:.2f}% top-1 (val)\n")
    print("| finetune | lr | augment | top-1 after 6 epochs | vs the model as trained |")
    print("|---|---|---|---|---|")
    for name, evaluation, chosen in rows:
        top1 = evaluation["compressed"]["top1"]
        print(f"| {name} | {chosen['lr']:.3g} | {chosen['augment']} | {100 * top1:.2f}% "
              f"| {100 * (top1 - original):+.2f} |")


if __name__ == "__main__":
    main()
