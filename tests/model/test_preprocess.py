"""`image(...)` completed from the model's own data config: timm's pretrained_cfg, a Hub tag's,
preprocessor_config.json; what the spec gives is kept, and the manifest says where each value came from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evc.driver import build
from evc.errors import InputError
from evc.model.preprocess import DataConfig, data_config, model_input, preprocessor_config, resolve
from evc.spec.check import parse_and_check
from evc.spec.plan import HubWeights, ImageSpec, ModelPlan, Source
from tests.conftest import ROOT, check_fails, put_checkpoint, run_evc, small_spec
from tests.model.test_hub import FIRST, REPO, hub_spec, small_vit

X5 = "target x5 { device = rdk_x5, format = bpu, calibrate = calib }\ndata calib { synthetic = 4 }"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_image_with_no_arguments_takes_the_timm_models_size_and_pretrained_cfg(write_spec, tmp_path):
    spec = write_spec(small_spec(X5).replace("image(32, 32)", "image()"))
    (result,) = build(parse_and_check(spec.read_text(), spec), tmp_path / "out")
    assert result.manifest["input"]["shape"] == [1, 3, 32, 32]  # img_size = 32, not the config's 224
    assert result.manifest["input"]["preprocessing"] == {
        "color": "RGB", "scale": "pixels / 255", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9,
        "interpolation": "bicubic",
        "source": {"size": "model (patch_embed.img_size)", "mean": "timm pretrained_cfg",
                   "std": "timm pretrained_cfg", "crop_pct": "timm pretrained_cfg",
                   "interpolation": "timm pretrained_cfg"}}
    # The resolved values, not the old ImageNet defaults, reach the BPU toolchain's config.
    inputs = yaml.safe_load((result.bundle / "config.yaml").read_text())["input_parameters"]
    assert inputs["mean_value"] == "127.5 127.5 127.5" and inputs["input_shape"] == "1x3x32x32"


def test_values_the_spec_gives_are_kept_and_the_rest_come_from_the_config():
    config = DataConfig.of({"height": 224, "width": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9,
                            "interpolation": "bicubic"}, "timm pretrained_cfg")
    image = resolve(ImageSpec(64, 48, mean=(0.1, 0.2, 0.3), interpolation="bilinear"), config, "m")
    assert (image.height, image.width, image.mean, image.std, image.crop_pct, image.interpolation) == (
        64, 48, (0.1, 0.2, 0.3), (0.5,) * 3, 0.9, "bilinear")
    assert dict(image.origin) == {"size": "spec", "mean": "spec", "std": "timm pretrained_cfg",
                                  "crop_pct": "timm pretrained_cfg", "interpolation": "spec"}


def test_a_model_that_declares_no_size_needs_one_in_the_spec():
    with pytest.raises(InputError, match="model 'cnn': image\\(\\) gives no size and the model declares none: "
                                         "write image\\(height, width\\)"):
        resolve(ImageSpec(), DataConfig.of({"mean": (0.5,) * 3}, "default (ImageNet)"), "cnn")


@pytest.mark.slow
def test_a_plain_module_without_a_size_exits_2_with_no_traceback(write_spec, tmp_path):
    (tmp_path / "cnn.py").write_text("from torch import nn\ndef small_cnn():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())\n")
    spec = write_spec('evc 1\nmodel cnn {\n    source = python("cnn:small_cnn")\n    input = image()\n}\n'
                      'target cpu { device = cpu, format = onnx }\n')
    done = run_evc("build", spec, "--out", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "write image(height, width)" in done.stderr


def _plan(weights=None, source=Source("timm", "vit_tiny_patch16_224"), image=ImageSpec()) -> ModelPlan:
    return ModelPlan("small", source, image, weights)


def test_a_hub_timm_tag_brings_the_preprocessing_of_those_weights():
    """deit_tiny's weights load into the vit_tiny architecture; their tag's config is ImageNet's, vit_tiny's is not."""
    config = data_config(small_vit(seed=0), _plan(HubWeights("timm/deit_tiny_patch16_224.fb_in1k")), Path("."))
    assert config.values["mean"] == tuple(IMAGENET["mean"]) and config.values["crop_pct"] == 0.9
    assert config.origin["mean"] == "timm pretrained_cfg of deit_tiny_patch16_224.fb_in1k"
    assert data_config(small_vit(seed=0), _plan(), Path(".")).values["mean"] == (0.5, 0.5, 0.5)


def test_a_plain_module_without_a_config_takes_imagenets_defaults():
    from torch import nn

    config = data_config(nn.Linear(2, 2), _plan(source=Source("python", "m:f")), Path("."))
    assert config.values == {**{k: tuple(v) for k, v in IMAGENET.items()}, "crop_pct": 0.875,
                             "interpolation": "bicubic"}
    assert set(config.origin.values()) == {"default (ImageNet)"}


def test_spec_values_that_differ_from_hub_weights_config_warn_and_a_file_of_ones_own_does_not(tmp_path):
    warnings = []
    image = ImageSpec(32, 32, crop_pct=0.875, mean=(0.5, 0.5, 0.5))
    model_input(_plan(HubWeights(REPO), image=image), small_vit(seed=0), tmp_path, warnings.append)
    assert warnings == ["model 'small': image(crop_pct = 0.875) differs from the weights' 0.9 (timm pretrained_cfg "
                        "of vit_tiny_patch16_224.augreg_in21k_ft_in1k); the spec's value is used"]
    warnings.clear()
    model_input(_plan(tmp_path / "own.safetensors", image=image), small_vit(seed=0), tmp_path, warnings.append)
    assert warnings == []


@pytest.mark.slow
def test_the_build_prints_the_warning_and_records_the_spec_as_the_source(hub_cache, tmp_path):
    put_checkpoint(hub_cache, REPO, FIRST, "model.safetensors", small_vit(seed=1))
    done = run_evc("build", hub_spec(tmp_path, image="image(interpolation = bilinear)"), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert ("warning: model 'small': image(interpolation = bilinear) differs from the weights' bicubic "
            f"(timm pretrained_cfg of {REPO.split('/')[1]}); the spec's value is used") in done.stderr
    preprocessing = json.loads((tmp_path / "out" / "hub" / "cpu" / "manifest.json").read_text())["input"][
        "preprocessing"]
    assert preprocessing["interpolation"] == "bilinear" and preprocessing["source"]["interpolation"] == "spec"
    assert preprocessing["source"]["crop_pct"] == f"timm pretrained_cfg of {REPO.split('/')[1]}"


# ---- preprocessor_config.json, as Hugging Face image processors write it ---------------------------

def write_processor(folder: Path, config: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


def test_a_resize_then_centre_crop_processor_is_timms_crop_pct(tmp_path):
    """DeiT's: resize to 256, crop 224, bicubic (PIL's 3)."""
    folder = write_processor(tmp_path / "deit", {
        "do_resize": True, "size": {"height": 256, "width": 256}, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "resample": 3, "do_normalize": True,
        "image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"]})
    config = preprocessor_config(folder)
    assert config.values == {"height": 224, "width": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                             "mean": tuple(IMAGENET["mean"]), "std": tuple(IMAGENET["std"])}
    assert set(config.origin.values()) == {"preprocessor_config.json"}


def test_a_resize_only_processor_is_crop_pct_1(tmp_path):
    """ViT's: resize to 224, no crop, bilinear (PIL's 2), mean and std 0.5."""
    folder = write_processor(tmp_path / "vit", {"do_resize": True, "size": {"height": 224, "width": 224},
                                                "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert preprocessor_config(folder).values == {"height": 224, "width": 224, "crop_pct": 1.0,
                                                  "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}


def test_a_processor_with_its_own_crop_pct_and_a_shortest_edge_keeps_them(tmp_path):
    """ConvNeXt's: shortest edge 224 at crop_pct 0.875; no normalisation leaves pixels in [0, 1]."""
    folder = write_processor(tmp_path / "convnext", {"size": {"shortest_edge": 224}, "crop_pct": 0.875,
                                                     "resample": 0, "do_normalize": False})
    assert preprocessor_config(folder).values == {"height": 224, "width": 224, "crop_pct": 0.875,
                                                  "interpolation": "nearest", "mean": (0.0,) * 3, "std": (1.0,) * 3}


def test_a_folder_without_a_processor_has_no_config_and_a_broken_one_is_bad_input(tmp_path):
    assert preprocessor_config(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text("{ not json")
    with pytest.raises(InputError, match="cannot read .*preprocessor_config.json"):
        preprocessor_config(tmp_path)


def test_checking_and_keys_of_an_image_left_to_the_model_import_neither_torch_nor_timm(write_spec):
    spec = write_spec(small_spec().replace("image(32, 32)", "image()"))
    code = ("import sys; from evc.spec.check import parse_and_check; from evc.keys import derive; "
            f"spec = {str(spec)!r}; derive(parse_and_check(open(spec).read(), spec)); "
            "assert not {'torch', 'timm'} & set(sys.modules), 'torch or timm was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("image, message", [
    ("image(32)", "4:13: error: input: image(...) takes two sizes, height and width, or none for the model's own"),
    ("image(crop_pct = 0)", "4:30: error: input: 0 is out of range: expected a number > 0 and <= 1"),
    ("image(interpolation = lanczos)", "4:35: error: input: unknown value 'lanczos'"),
])
def test_a_malformed_image_call_is_a_spec_error_at_its_span(write_spec, image, message):
    stderr = check_fails(write_spec(small_spec().replace("image(32, 32)", image)))
    assert message in stderr
