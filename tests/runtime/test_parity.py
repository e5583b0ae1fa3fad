"""Parity between an artifact's outputs and PyTorch's."""

import numpy as np
import pytest

from evc.runtime.parity import compare


def test_identical_outputs_have_cosine_1_and_full_agreement():
    x = np.random.default_rng(0).standard_normal((4, 10))
    parity = compare(x, x.copy())
    assert parity.max_abs_diff == 0 and parity.cosine == pytest.approx(1.0) and parity.top1_agreement == 1.0


def test_an_all_zero_output_agrees_with_nothing():
    """A collapsed int8 model outputs zeros: that must not pass on cosine."""
    x = np.random.default_rng(0).standard_normal((4, 10))
    assert compare(x, np.zeros_like(x)).cosine == 0.0
    assert compare(np.zeros_like(x), np.zeros_like(x)).cosine == 1.0


def test_cosine_is_the_worst_sample_and_top1_the_share_that_agrees():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    outputs = np.array([[1.0, 0.0], [1.0, 0.0]])
    parity = compare(reference, outputs)
    assert parity.cosine == 0.0 and parity.top1_agreement == 0.5 and parity.samples == 2
