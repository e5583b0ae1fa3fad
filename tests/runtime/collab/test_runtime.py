"""A bundle's models run here: each part in its own runtime, one image at a time, and the fusion fed what
the contract says, zeros and present = 0 for a missing part."""

import numpy as np
import onnxruntime as ort
import pytest

from evc.errors import InputError
from evc.runtime.collab.contract import read
from evc.runtime.collab.runtime import Fusion, local_infer, part_model
from tests.runtime.collab.conftest import collab_of, images, write_collab


def _onnx(path, **inputs):
    """Run an ONNX file one row at a time, by hand: what the runtime must agree with."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = len(next(iter(inputs.values())))
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in inputs.items()})[0] for i in range(rows)])


def test_an_onnx_part_gives_its_models_features_for_any_batch(bundles):
    """The parts are exported at batch 1; a batch of 3 runs one image at a time."""
    x = images(3)
    np.testing.assert_array_equal(part_model(read(bundles["two"]), 0)(x), _onnx(bundles["two"] / "part0.onnx", input=x))


def test_a_tflite_part_gives_its_models_features_in_the_litert_interpreter(bundles):
    from ai_edge_litert.interpreter import Interpreter

    x = images(2)
    runner = Interpreter(model_path=str(bundles["two"] / "part1.tflite")).get_signature_runner()
    expected = np.concatenate([runner(input=x[i:i + 1])["features"] for i in range(2)])
    np.testing.assert_allclose(part_model(read(bundles["two"]), 1)(x), expected, atol=1e-6)


def test_a_missing_part_reaches_the_fusion_as_zeros_and_present_0(bundles):
    bundle = bundles["three"]
    x = images(2)
    collab = read(bundle)
    first, last = part_model(collab, 0)(x), part_model(collab, 2)(x)
    tokens = np.concatenate([first, np.zeros((2, 16), np.float32), last], axis=1)
    present = np.array([[1, 0, 1]] * 2, np.float32)
    expected = _onnx(bundle / "fusion.onnx", tokens=tokens, present=present)
    np.testing.assert_array_equal(local_infer(bundle, x, missing=(1,)), expected)
    # With every part: present all ones.
    full = np.concatenate([first, part_model(collab, 1)(x), last], axis=1)
    np.testing.assert_array_equal(local_infer(bundle, x), _onnx(bundle / "fusion.onnx", tokens=full,
                                                                present=np.ones((2, 3), np.float32)))


def test_a_fusion_without_tokens_and_present_inputs_is_refused_naming_its_inputs(bundles, tmp_path):
    (tmp_path / "fusion.onnx").write_bytes((bundles["two"] / "part0.onnx").read_bytes())
    write_collab(tmp_path, collab_of(bundles["two"]))
    with pytest.raises(InputError, match=r"fusion.onnx: the fusion takes inputs \['input'\]; it must take exactly "
                                         r"'tokens' \(B, 40\) and 'present' \(B, 2\)"):
        Fusion(read(tmp_path))


def test_a_fusion_for_another_token_width_is_refused_at_load(bundles, tmp_path):
    (tmp_path / "fusion.onnx").write_bytes((bundles["three"] / "fusion.onnx").read_bytes())
    write_collab(tmp_path, collab_of(bundles["two"]))
    with pytest.raises(InputError, match=r"fusion.onnx does not run on what collab.json says it takes, "
                                         r"tokens \(1, 40\) and present \(1, 2\): "):
        Fusion(read(tmp_path))


def test_a_file_that_is_not_a_model_is_refused_naming_it(bundles, tmp_path):
    (tmp_path / "part0.onnx").write_bytes(b"not a model")
    write_collab(tmp_path, collab_of(bundles["two"]))
    with pytest.raises(InputError, match=r"cannot load part 0's model .*part0.onnx: "):
        part_model(read(tmp_path), 0)


def test_local_infer_needs_one_part_at_least(bundles):
    with pytest.raises(InputError, match="every part is missing"):
        local_infer(bundles["two"], images(1), missing=(0, 1))


def test_a_picture_is_read_as_uint8_pixels_that_normalise_to_the_eval_transform_bit_for_bit(bundles, tmp_path):
    """`evc infer` sends pictures as pixels, a quarter of the bytes; the part's normalising must give exactly
    the images `evc build` validated with."""
    from evc.model.data import eval_transform, read_rgb
    from evc.runtime.collab.images import read_batch
    from tests.conftest import write_images

    collab = read(bundles["two"])
    picture = next(write_images(tmp_path, 1, height=40, width=50).iterdir())
    pixels = read_batch(picture, collab)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, *collab.input_shape)
    expected = eval_transform(collab.image)(read_rgb(picture)).numpy()[None]
    np.testing.assert_array_equal(collab.normalised(pixels), expected)
    np.testing.assert_array_equal(local_infer(bundles["two"], pixels), local_infer(bundles["two"], expected))
