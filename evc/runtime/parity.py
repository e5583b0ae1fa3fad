"""How close an artifact's outputs are to the PyTorch model's on the same inputs.

A classifier's output, (batch, classes), is judged on max abs diff, cosine
and top-1 agreement; a map (segmentation, depth, a backbone's features: any
other shape) on max abs diff and cosine alone: its argmax names no class.
Cosine is per sample: the worst says how far one input strayed, the mean how
far the artifact as a whole did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    cosine: float  # the worst per-sample cosine similarity
    mean_cosine: float  # the mean of the per-sample cosines
    top1_agreement: float | None  # share of samples whose argmax agrees; None for a map
    samples: int

    def within(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance

    def beyond(self, tolerance: float) -> str | None:
        """Why the largest difference from PyTorch misses `tolerance`; None if it is within."""
        if self.within(tolerance):
            return None
        return f"max abs diff {self.max_abs_diff:.3g} exceeds tolerance {tolerance:g}"

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: np.ndarray, outputs: np.ndarray) -> Parity:
    is_map = reference.ndim != 2
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    outputs = outputs.reshape(len(outputs), -1).astype(np.float64)
    if reference.shape != outputs.shape:
        raise ValueError(f"output shapes differ: {reference.shape} vs {outputs.shape}")
    dot = (reference * outputs).sum(axis=1)
    ref_norm, out_norm = np.linalg.norm(reference, axis=1), np.linalg.norm(outputs, axis=1)
    norms = ref_norm * out_norm
    # Two zero vectors agree; one zero vector agrees with nothing (a collapsed int8 model outputs zeros).
    both_zero = (ref_norm == 0) & (out_norm == 0)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-300), np.where(both_zero, 1.0, 0.0))
    agree = reference.argmax(axis=1) == outputs.argmax(axis=1)
    return Parity(
        max_abs_diff=float(np.abs(reference - outputs).max()),
        cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        top1_agreement=None if is_map else float(agree.mean()),
        samples=len(reference),
    )


def describe(parity: dict | None, gate: dict | None = None) -> str:
    """A manifest's parity record in one line; an artifact whose `gate` was not applied says why instead."""
    if not parity:
        return "not checked"
    if gate and not gate.get("applied", True) and gate.get("summary"):
        return f"not judged: {gate['summary']} (figures in manifest.json)"
    agreement = parity.get("top1_agreement")
    top1 = "a map" if agreement is None else f"{agreement:.0%}"
    cosine = f"cosine {parity['cosine']:.5f}"
    if "mean_cosine" in parity:  # manifests written before evc recorded it have none
        cosine += f" (mean {parity['mean_cosine']:.5f})"
    return f"max|Δ| {parity['max_abs_diff']:.2g}, {cosine}, top-1 {top1}"
