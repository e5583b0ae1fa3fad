"""Errors found only when the model is loaded, in a value the spec gives, point at that value as checking's do:
`path:line:col: error: ...`, the line, a caret under the value. Exit code 2, no traceback."""

import pytest

from tests.conftest import SMALL_MODEL, run_evc, small_spec


def spec_with(source: str = SMALL_MODEL, extra: str = "") -> str:
    return small_spec(model_extra=extra).replace(SMALL_MODEL, source)


def fails_at(spec, line: int, col: int, message: str, command: str = "build") -> str:
    done = run_evc(command, spec, "--out", spec.parent / "out")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{spec}:{line}:{col}: error: {message}" in done.stderr, done.stderr
    assert f"{line} | " in done.stderr and "^" in done.stderr  # the line, and a caret under the value
    return done.stderr


@pytest.mark.slow
def test_a_timm_model_that_does_not_exist_points_at_the_source(write_spec):
    spec = write_spec(spec_with('timm("vit_tiny_patch16_22", img_size = 32)'))
    stderr = fails_at(spec, 3, 14, "timm has no model 'vit_tiny_patch16_22'")
    assert "did you mean 'vit_tiny_patch16_224'" in stderr
    caret = stderr.splitlines()[-1]
    assert caret.index("^") == len("  |     source = ") and caret.count("^") == len('timm("vit_tiny_patch16_22", '
                                                                                   'img_size = 32)')


@pytest.mark.slow
def test_explain_points_there_too(write_spec):
    fails_at(write_spec(spec_with('timm("vit_tiny_patch16_22")')), 3, 14, "timm has no model", command="explain")


@pytest.mark.slow
def test_an_argument_timm_rejects_points_at_the_source(write_spec):
    spec = write_spec(spec_with('timm("vit_tiny_patch16_224", img_size = 32, depth_of_field = 2)'))
    fails_at(spec, 3, 14, 'timm("vit_tiny_patch16_224"): ')


@pytest.mark.slow
def test_a_python_factory_that_cannot_be_imported_points_at_the_source(write_spec):
    spec = write_spec(spec_with('python("no_such_module_here:build")'))
    fails_at(spec, 3, 14, "python(\"no_such_module_here:build\"): cannot import 'no_such_module_here'")


@pytest.mark.slow
def test_an_output_the_model_does_not_return_points_at_output(write_spec):
    spec = write_spec(spec_with(extra='    output = "probs"\n'))
    fails_at(spec, 5, 14, 'output = "probs": model')


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_points_at_weights(write_spec, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    spec = write_spec(spec_with(extra='    weights = "other.safetensors"\n'))
    stderr = fails_at(spec, 5, 15, f"checkpoint {tmp_path / 'other.safetensors'} does not fit model 'small'")
    assert "missing keys" in stderr


@pytest.mark.slow
def test_an_image_without_a_size_for_a_model_that_declares_none_points_at_input(write_spec, tmp_path):
    """A model of the user's own, which declares no input size: image() must give one."""
    (tmp_path / "nosize.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(10))\n")
    spec = write_spec(spec_with('python("nosize:build")').replace("image(32, 32)", "image()"))
    fails_at(spec, 4, 13, "model 'small': image() gives no size")
