"""The paper's CIFAR augmentation on training batches, and the ImageNet-style ``image-folder`` task on a
tiny generated folder of PNGs (no downloads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gapaware.common.augment import padded_crop_flip
from gapaware.common.buffers import load_buffers
from gapaware.common.config import RunConfig
from gapaware.common.evaluation import evaluate
from gapaware.common.layout import load_flat_parameters
from gapaware.common.tasks import IMAGENET_MEAN, IMAGENET_STD, TaskError, load_task
from tests.test_param_groups import train_in_process
from tests.test_tasks import write_fake_cifar

COLOURS = {"blue": (20, 40, 230), "red": (230, 30, 20)}


def test_padded_crop_flip_is_a_crop_of_the_padded_image_maybe_mirrored():
    images = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5).repeat(40, 1, 1, 1)
    out = padded_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen_offsets, flips = set(), 0
    for image, source in zip(out, padded):
        candidates = {(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                      if torch.equal(image, (source[:, top:top + 6, left:left + 5].flip(2) if flip
                                             else source[:, top:top + 6, left:left + 5]))}
        assert candidates, "every output is a crop of the padded image, mirrored or not"
        top, left, flip = sorted(candidates)[0]
        seen_offsets.add((top, left))
        flips += flip
    assert len(seen_offsets) > 10 and 20 < flips < 60, (len(seen_offsets), flips)


def test_the_cifar_task_augments_training_batches_only(tmp_path):
    write_fake_cifar(tmp_path)
    task = load_task("cifar10-resnet20", data_dir=str(tmp_path))
    assert task.augment is padded_crop_flip, "the worker augments each training batch"
    inputs = task.train.tensors[0]
    augmented = task.augment(inputs, torch.Generator().manual_seed(1))
    assert augmented.shape == inputs.shape and not torch.equal(augmented, inputs)
    assert torch.equal(load_task("cifar10-resnet20", data_dir=str(tmp_path)).test.tensors[0], task.test.tensors[0])


def write_image_folder(root, per_class: int = 12) -> None:
    """``root/{train,val}/{blue,red}/*.png``, images of varied sizes in one noisy colour per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = rng.integers(20, 48, size=2)
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (height, width, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


def test_image_folder_reads_class_folders_of_pngs(tmp_path):
    write_image_folder(tmp_path)
    task = load_task("image-folder", data_dir=str(tmp_path))
    assert (len(task.train), len(task.test)) == (24, 12)
    assert [label for _, label in task.train.samples] == [0] * 12 + [1] * 12, "classes: sorted folder names"
    image, label = task.train[0]
    assert image.shape == (3, 32, 32) and label == 0
    with Image.open(task.train.samples[0][0]) as original:
        mean_rgb = np.asarray(original.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255
    expected = (torch.tensor(mean_rgb) - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / \
        torch.tensor(IMAGENET_STD, dtype=torch.float64)
    assert torch.allclose(image.double().mean(dim=(1, 2)), expected, atol=0.05), "normalised with ImageNet's statistics"
    assert task.augment is padded_crop_flip and task.model.head[-1].out_features == 2


def test_image_folder_trains_a_classifier(tmp_path):
    write_image_folder(tmp_path)
    config = RunConfig(task="image-folder", data_dir=str(tmp_path), policy="gap-aware", lr=0.05, momentum=0.9,
                       schedule="constant", max_updates=12, batch_size=8, eval_every=1000)
    state, _, task = train_in_process(config)
    load_flat_parameters(task.model, state.parameters()[1])
    load_buffers(task.model, state.buffer_tensors())
    _, accuracy = evaluate(task.model, task.loss, task.test)
    assert state.version == 12 and accuracy == 1.0, accuracy


def test_image_folder_says_what_it_needs(tmp_path):
    with pytest.raises(TaskError, match="--data-dir DIR"):
        load_task("image-folder")
    with pytest.raises(TaskError, match="no train or val folder"):
        load_task("image-folder", data_dir=str(tmp_path))
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "val" / "green").mkdir()
    with pytest.raises(TaskError, match="class folders that train lacks: green"):
        load_task("image-folder", data_dir=str(tmp_path))
