"""Data blocks as datasets: layouts and labels, split and part, limit, unreadable images, and the errors."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evc.errors import InputError
from evc.keys import data_identity
from evc.model.data import (
    SkippedImage,
    classes,
    dataset,
    load_images,
    load_labelled,
    shares,
)
from evc.spec.plan import DataPlan, ImageInput
from tests.conftest import run_evc, small_spec, write_images

IMAGE = ImageInput(32, 32)


def folder_data(folder: Path, name="d", seed=0, limit=None, split=None, part=None, skip_bad=False) -> DataPlan:
    return DataPlan(name, None, folder, seed, limit, split, part, skip_bad)


def class_folder(root: Path, counts: dict[str, int]) -> Path:
    """One subfolder of random images per class: `{"cat": 3, "dog": 2}`."""
    root.mkdir(exist_ok=True)
    for seed, (name, count) in enumerate(counts.items()):
        write_images(root / name, count, seed=seed)
    return root


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header reads, its pixels do not."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return path


# Layouts and labels

def test_class_subfolders_are_labelled_as_torchvision_imagefolder_labels_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = class_folder(tmp_path / "train", {"dog": 2, "Zebra": 1, "cat": 3})
    images = dataset(folder_data(root), IMAGE)
    reference = ImageFolder(str(root))
    assert images.classes == reference.classes == ["Zebra", "cat", "dog"]
    assert list(zip(images.files, images.labels)) == [(Path(p), label) for p, label in reference.samples]


def test_load_labelled_gives_each_image_its_class_index(tmp_path):
    root = class_folder(tmp_path / "train", {"b": 2, "a": 3})
    pixels, labels = load_labelled(folder_data(root), IMAGE)
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert classes(folder_data(root)) == ["a", "b"]


def test_a_flat_folder_is_unlabelled(tmp_path):
    root = write_images(tmp_path / "calib", 3)
    pixels, labels = load_labelled(folder_data(root), IMAGE)
    assert pixels.shape == (3, 3, 32, 32) and labels is None
    assert classes(folder_data(root)) is None
    assert [dataset(folder_data(root), IMAGE)[i][1] for i in range(3)] == [-1, -1, -1]


def test_a_flat_folder_ignores_its_subfolders_without_images_and_hidden_files(tmp_path):
    root = write_images(tmp_path / "calib", 2)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image")
    (root / "._0_0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert [p.name for p in dataset(folder_data(root), IMAGE).files] == ["0_0.png", "0_1.png"]


def test_images_both_directly_in_the_folder_and_in_subfolders_are_an_error_naming_one_of_each(tmp_path):
    root = class_folder(tmp_path / "mixed", {"cat": 1})
    write_images(root, 1, seed=7)
    with pytest.raises(InputError) as caught:
        dataset(folder_data(root), IMAGE)
    message = str(caught.value)
    assert str(root) in message and "(7_0.png)" in message and f"({Path('cat') / '0_0.png'})" in message


def test_an_empty_folder_is_an_error_naming_it_and_the_suffixes_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "labels.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"no images \(\.bmp, .*\.png.*\) found in .*empty"):
        load_images(folder_data(tmp_path / "empty"), IMAGE)


def test_a_class_folder_without_images_is_an_error_naming_it(tmp_path):
    root = class_folder(tmp_path / "train", {"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(InputError, match=r"class folder .*train/dog holds no images"):
        dataset(folder_data(root), IMAGE)


def test_a_folder_gone_since_the_check_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"no such folder of images: .*gone"):
        load_images(folder_data(tmp_path / "gone"), IMAGE)


# Synthetic images and transforms

def test_synthetic_images_are_the_seeded_uniform_draw_normalised(tmp_path):
    data = DataPlan("s", 5, None, 3, None)
    mean = np.asarray(IMAGE.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGE.std, dtype=np.float32).reshape(1, 3, 1, 1)
    expected = (np.random.default_rng(3).random((5, 3, 32, 32), dtype=np.float32) - mean) / std
    np.testing.assert_array_equal(load_images(data, IMAGE), expected)
    odd = ImageInput(5, 7)  # an odd number of values per image starts image 1 mid-draw
    pixels = np.random.default_rng(3).random((5, 3, 5, 7), dtype=np.float32)
    np.testing.assert_array_equal(load_images(data, odd), (pixels - mean) / std)
    assert classes(data) is None and load_labelled(data, IMAGE)[1] is None


def test_the_training_transform_is_random_and_the_eval_transform_is_not(tmp_path):
    root = write_images(tmp_path / "train", 1, height=64, width=64)
    train, val = dataset(folder_data(root), IMAGE, train=True), dataset(folder_data(root), IMAGE)
    draws = [train[0][0] for _ in range(4)]
    assert draws[0].shape == (3, 32, 32) and draws[0].dtype.is_floating_point
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    np.testing.assert_array_equal(val[0][0], val[0][0])
    np.testing.assert_array_equal(val[0][0], load_images(folder_data(root), IMAGE)[0])


def test_a_dataloader_batches_a_labelled_folder(tmp_path):
    from torch.utils.data import DataLoader

    root = class_folder(tmp_path / "train", {"a": 2, "b": 1})
    batches = list(DataLoader(dataset(folder_data(root), IMAGE, train=True), batch_size=2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    assert [y.tolist() for _, y in batches] == [[0, 0], [1]]


# split and part

def test_shares_round_by_largest_remainder_and_give_each_part_one_while_there_are_enough():
    assert shares(10, (0.9, 0.1)) == [9, 1]
    assert shares(5, (0.9, 0.1)) == [4, 1]
    assert shares(3, (0.9, 0.1)) == [2, 1]
    assert shares(1, (0.9, 0.1)) == [1, 0]
    assert shares(7, (0.5, 0.25, 0.25)) == [3, 2, 2]


def part_files(root, part, split=(0.6, 0.2, 0.2), seed=0, limit=None) -> list[Path]:
    return dataset(folder_data(root, seed=seed, limit=limit, split=split, part=part), IMAGE).files


def test_the_parts_of_a_split_are_disjoint_and_cover_the_folder(tmp_path):
    root = class_folder(tmp_path / "train", {"a": 10, "b": 7, "c": 3})
    parts = [set(part_files(root, part)) for part in (1, 2, 3)]
    assert sum(len(p) for p in parts) == 20
    assert set().union(*parts) == set(dataset(folder_data(root), IMAGE).files)


def test_a_split_divides_each_class_by_the_fractions(tmp_path):
    root = class_folder(tmp_path / "train", {"a": 10, "b": 20, "c": 5})
    val = dataset(folder_data(root, split=(0.9, 0.1), part=2), IMAGE)
    per_class = {name: sum(1 for label in val.labels if val.classes[label] == name) for name in "abc"}
    assert per_class == {"a": 1, "b": 2, "c": 1}
    assert all(val.classes[label] == path.parent.name for path, label in zip(val.files, val.labels))


def test_a_split_of_an_unlabelled_folder_divides_it_by_the_fractions(tmp_path):
    root = write_images(tmp_path / "calib", 10)
    assert [len(part_files(root, part, split=(0.7, 0.3))) for part in (1, 2)] == [7, 3]


def test_a_split_is_the_same_for_a_seed_and_differs_for_another(tmp_path):
    root = class_folder(tmp_path / "train", {"a": 10, "b": 10})
    assert part_files(root, 1, seed=0) == part_files(root, 1, seed=0)
    assert set(part_files(root, 1, seed=0)) != set(part_files(root, 1, seed=1))


def test_limit_applies_to_the_share_after_the_split_and_keeps_the_classes_mixed(tmp_path):
    root = class_folder(tmp_path / "train", {"a": 10, "b": 10})
    whole = part_files(root, 1, split=(0.5, 0.5))
    limited = part_files(root, 1, split=(0.5, 0.5), limit=4)
    assert limited == whole[:4]
    assert {p.parent.name for p in limited} == {"a", "b"}


def test_limit_without_a_split_keeps_the_first_images_in_file_order(tmp_path):
    root = class_folder(tmp_path / "train", {"a": 3, "b": 3})
    assert [f"{p.parent.name}/{p.name}" for p in dataset(folder_data(root, limit=2), IMAGE).files] == \
        ["a/0_0.png", "a/0_1.png"]


def test_an_empty_share_is_an_error_naming_the_data_block(tmp_path):
    root = write_images(tmp_path / "calib", 1)
    with pytest.raises(InputError, match=r"data 'val' has no images: its share of the split is empty"):
        dataset(folder_data(root, name="val", split=(0.9, 0.1), part=2), IMAGE)


# Unreadable images

def test_skip_bad_leaves_out_unreadable_images_with_a_warning_naming_each(tmp_path):
    root = write_images(tmp_path / "calib", 3)
    (root / "notes.png").write_text("not an image")
    truncated_jpeg(root / "cut.jpg")
    with pytest.warns(SkippedImage) as caught:
        images = dataset(folder_data(root, skip_bad=True), IMAGE)
    assert len(images) == 3 and [p.name for p, _ in images.skipped] == ["cut.jpg", "notes.png"]
    messages = " ".join(str(w.message) for w in caught)
    assert str(root / "cut.jpg") in messages and str(root / "notes.png") in messages
    with pytest.warns(SkippedImage):
        assert load_images(folder_data(root, skip_bad=True), IMAGE).shape == (3, 3, 32, 32)


def test_skip_bad_keeps_limit_readable_images(tmp_path):
    root = write_images(tmp_path / "calib", 3)
    (root / "0_00.png").write_text("sorts first, reads never")
    with pytest.warns(SkippedImage):
        assert len(dataset(folder_data(root, limit=3, skip_bad=True), IMAGE)) == 3


def test_without_skip_bad_an_unreadable_image_is_an_error_naming_it(tmp_path):
    root = write_images(tmp_path / "calib", 2)
    (root / "notes.png").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning: it stops
        with pytest.raises(InputError, match=r"cannot read image .*calib/notes\.png: not an image .*skip_bad = true"):
            dataset(folder_data(root), IMAGE)


def test_without_skip_bad_a_truncated_jpeg_is_an_error_naming_it_when_read(tmp_path):
    root = write_images(tmp_path / "calib", 2)
    truncated_jpeg(root / "cut.jpg")
    with pytest.raises(InputError, match=r"cannot read image .*calib/cut\.jpg: image file is truncated"):
        load_images(folder_data(root), IMAGE)


def test_a_folder_of_only_unreadable_images_is_an_error_under_skip_bad(tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.png").write_text("no")
    with pytest.warns(SkippedImage), pytest.raises(InputError, match="every image it selects is unreadable"):
        dataset(folder_data(tmp_path / "calib", skip_bad=True), IMAGE)


# Cache identity

def test_the_data_identity_changes_with_split_part_skip_bad_and_the_files(tmp_path):
    root = write_images(tmp_path / "calib", 4)
    base = data_identity(folder_data(root, split=(0.5, 0.5), part=1))
    for changed in (folder_data(root, split=(0.75, 0.25), part=1), folder_data(root, split=(0.5, 0.5), part=2),
                    folder_data(root, split=(0.5, 0.5), part=1, skip_bad=True)):
        assert data_identity(changed) != base
    write_images(root, 1, seed=1)
    assert data_identity(folder_data(root, split=(0.5, 0.5), part=1)) != base


# Through the command line

def validated_on(folder: str, data: str = "") -> str:
    return small_spec("target cpu { device = cpu, format = onnx, validate = val }",
                      extra=f'data val {{ images = "{folder}"{data} }}\n')


@pytest.mark.slow
def test_an_unreadable_image_stops_the_build_with_exit_2_naming_it(write_spec, tmp_path):
    (write_images(tmp_path / "val", 2) / "notes.png").write_text("not an image")
    done = run_evc("build", write_spec(validated_on("val")), "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert f"error: cannot read image {tmp_path / 'val' / 'notes.png'}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_skip_bad_builds_and_the_warning_names_the_skipped_image(write_spec, tmp_path):
    (write_images(tmp_path / "val", 2) / "notes.png").write_text("not an image")
    done = run_evc("build", write_spec(validated_on("val", ", skip_bad = true")), "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"warning: data 'val': skipped unreadable image {tmp_path / 'val' / 'notes.png'}" in done.stderr


@pytest.mark.parametrize("data, where, message", [
    (", split = [0.8, 0.1], part = 1", "6:36", "split: the shares sum to 0.9, not 1"),
    (", split = [0.9, 0.1], part = 3", "6:55", "part: 3 is out of range: split has 2 shares"),
    (", part = 1", "6:35", "part needs split: add `split = [...]`"),
    (", split = [0.9, 0.1]", "6:36", "split needs part: add `part = N`"),
])
def test_a_bad_split_is_a_check_error_at_its_line_and_column(write_spec, tmp_path, data, where, message):
    (tmp_path / "val").mkdir()
    spec = write_spec(validated_on("val", data))
    done = run_evc("check", spec)
    assert done.returncode == 2
    assert f"{spec}:{where}: error: {message}" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("side, expected", [(32, ("none", None)), (63, ("none", None)), (64, ("standard", 0.98)),
                                            (112, ("standard", 0.32)), (224, ("standard", 0.08)),
                                            (448, ("standard", 0.02))])
def test_augment_auto_crops_keep_as_many_pixels_as_timms_8_percent_of_224(side, expected):
    from evc.model.data import fitting_augmentation
    from evc.spec.plan import ImageInput

    assert fitting_augmentation(ImageInput(side, side)) == expected
