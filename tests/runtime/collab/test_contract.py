"""collab.json as the runtime reads it: every key checked, and an error names the key at fault."""

import pytest

from evc.errors import InputError
from evc.runtime.collab.contract import read
from tests.runtime.collab.conftest import collab_of, write_collab

# The contract's own example: the models are not read, only named.
EXAMPLE = {"version": 1,
           "input": {"name": "input", "shape": [3, 32, 32], "dtype": "float32"},
           "parts": [{"index": 0, "model": "part0.onnx", "output_dim": 16},
                     {"index": 1, "model": "part1.tflite", "output_dim": 24}],
           "fusion": {"model": "fusion.onnx", "degraded_ok": True},
           "deadline_ms": 2000}


@pytest.fixture
def bundle(tmp_path):
    write_collab(tmp_path, EXAMPLE)
    return tmp_path


def test_the_example_reads_as_written(bundle):
    collab = read(bundle)
    assert collab.input_shape == (3, 32, 32) and collab.input_name == "input"
    assert [(p.index, p.model, p.output_dim, p.format) for p in collab.parts] == [
        (0, "part0.onnx", 16, "onnx"), (1, "part1.tflite", 24, "tflite")]
    assert collab.fusion == "fusion.onnx" and collab.degraded_ok is True and collab.deadline_ms == 2000
    # Left out, preprocessing is ImageNet's, as `evc build` defaults it.
    assert collab.image.mean == (0.485, 0.456, 0.406) and collab.image.crop_pct == 0.875


@pytest.mark.parametrize("change, key", [
    (lambda c: c["parts"][1].update(output_dim=0), "parts[1].output_dim: expected a positive integer, got 0"),
    (lambda c: c["parts"][1].update(output_dim=True), "parts[1].output_dim: expected a positive integer, got true"),
    (lambda c: c["parts"][1].update(index=0), "parts[1].index: expected 1 (parts are listed in order, from 0)"),
    (lambda c: c["parts"][0].update(model="part0.pt"), "parts[0].model: expected the name of an .onnx or .tflite"),
    (lambda c: c["parts"][0].pop("model"), "parts[0].model: missing"),
    (lambda c: c["parts"][0].update(sha256="abc"), "parts[0].sha256: expected 64 hex digits"),
    (lambda c: c.update(parts=[]), "parts: expected a non-empty list, got []"),
    (lambda c: c.pop("parts"), "parts: missing"),
    (lambda c: c["parts"].append(3), "parts[2]: expected a table"),
    (lambda c: c["fusion"].pop("degraded_ok"), "fusion.degraded_ok: missing; expected true or false"),
    (lambda c: c["fusion"].update(degraded_ok="yes"), 'fusion.degraded_ok: expected true or false, got "yes"'),
    (lambda c: c["fusion"].update(model="fusion.tflite"), "fusion.model: expected the name of an .onnx file"),
    (lambda c: c["input"].update(shape=[3, 32]), "input.shape: expected a list of 3 positive integers"),
    (lambda c: c["input"].update(dtype="uint8"), 'input.dtype: expected "float32", got "uint8"'),
    (lambda c: c["input"].update(mean=[0.5, 0.5]), "input.mean: expected a list of 3 numbers"),
    (lambda c: c["input"].update(std=[1, 0, 1]), "input.std: expected a list of 3 numbers"),
    (lambda c: c["input"].update(interpolation="area"), "input.interpolation: expected one of bilinear"),
    (lambda c: c.update(deadline_ms=-5), "deadline_ms: expected a positive number of milliseconds, got -5"),
    (lambda c: c.update(version=2), "version: expected 1, got 2"),
])
def test_a_malformed_collab_json_names_the_key(bundle, change, key):
    collab = collab_of(bundle)
    change(collab)
    write_collab(bundle, collab)
    with pytest.raises(InputError) as e:
        read(bundle)
    assert str(e.value).startswith(f"{bundle / 'collab.json'}: {key}")


def test_a_file_that_is_not_json_is_named_with_line_and_column(bundle):
    (bundle / "collab.json").write_text('{"version": 1,\n "parts": [,]}')
    with pytest.raises(InputError, match=r"collab.json:2:12: not valid JSON"):
        read(bundle)


def test_a_folder_without_collab_json_is_not_a_decomposed_bundle(tmp_path):
    with pytest.raises(InputError, match="is not a decomposed bundle: it has no collab.json"):
        read(tmp_path)
    with pytest.raises(InputError, match="no such bundle folder"):
        read(tmp_path / "absent")
