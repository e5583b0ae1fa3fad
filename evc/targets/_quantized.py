"""Parity for quantized artifacts, shared by the formats that quantize (tflite, onnx).

    THRESHOLDS = {"dynamic": (0.99, 0.9), "int8": (0.6, 0.75)}    # per mode: worst cosine, top-1 agreement
    Param(...), *threshold_params(THRESHOLDS)                       # min_cosine, min_top1, declared once
    limits = parity_thresholds(params, THRESHOLDS, ctx.random_weights)   # what lower records
    reason = check_quantized(parity, params["quantize"], limits)         # what check_parity answers

A quantized artifact cannot match PyTorch to 1e-4, so it is judged on its
worst per-sample cosine to the reference and its top-1 agreement; each format
states its own figures, measured on its own quantizer. Unquantized, the max
abs diff within `tolerance` decides.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from evc.spec.params import Float, Param, Ratio

RANDOM_TOP1 = "the weights are random, so the reference's top-1 is noise that any rounding flips"


def threshold_params(thresholds: dict) -> tuple[Param, Param]:
    """`min_cosine` and `min_top1`, their help naming the format's defaults per mode."""

    def defaults(i: int) -> str:
        return ", ".join(f"{mode} {limits[i]:g}" for mode, limits in thresholds.items())

    return (Param("min_cosine", Float(-1, 1), None,
                  f"worst cosine to PyTorch that passes a quantized mode (default: {defaults(0)})"),
            Param("min_top1", Ratio(), None,
                  f"top-1 agreement with PyTorch that passes a quantized mode (default: {defaults(1)}; "
                  "not judged at random weights)"))


def parity_thresholds(params: dict, thresholds: dict, random_weights: bool) -> dict:
    """What an artifact must reach, as the manifest records it."""
    mode = params["quantize"]
    if mode == "none":
        return {"max_abs_diff": params["tolerance"]}
    cosine, top1 = thresholds[mode]
    limits = {"cosine": cosine if params["min_cosine"] is None else params["min_cosine"],
              "top1_agreement": top1 if params["min_top1"] is None else params["min_top1"]}
    if random_weights and params["min_top1"] is None:
        limits.update(top1_agreement=None, top1_not_judged=RANDOM_TOP1)
    return limits


def check_quantized(parity, mode: str, limits: dict) -> str | None:
    """None if `parity` passes `limits` (as parity_thresholds recorded them), else why not."""
    if "max_abs_diff" in limits:
        return parity.beyond(limits["max_abs_diff"])
    if parity.cosine < limits["cosine"]:
        return f"quantize = {mode}: worst cosine {parity.cosine:.5f} is below {limits['cosine']:g}"
    if None not in (limits["top1_agreement"], parity.top1_agreement) and parity.top1_agreement < limits[
            "top1_agreement"]:
        return (f"quantize = {mode}: top-1 agreement {parity.top1_agreement:.1%} is below "
                f"{limits['top1_agreement']:.1%}")
    return None


@contextlib.contextmanager
def quiet():
    """The quantizer advises on the root logger (which would configure it to print) and warns in Python."""
    root = logging.getLogger()
    hush = logging.NullHandler()
    root.addHandler(hush)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(hush)
