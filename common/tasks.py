"""What is trained: a model, its loss and the data, as built-in tasks or a user's factory.

Server and workers each call :func:`load_task` with the same spec and seed and must end
up with the same initial parameters and the same train/test split: the model is built
right after ``torch.manual_seed(seed)``, and every split uses a fixed seed of its own.
"""
from __future__ import annotations

import functools
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from gapaware.common.augment import padded_crop_flip
from gapaware.common.registry import TASK_NAMES

SPLIT_SEED = 0  # fixed, never the model seed: server and workers must agree on the split
DATA_DIR_ENV = "GAPAWARE_DATA_DIR"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FOLDER_SIZE = 32
"""The side of the square images the ``image-folder`` task trains its ResNet-20 on (downsampled
ImageNet's 32x32, Chrabaszcz, Loshchilov and Hutter 2017)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class TaskError(ValueError):
    """A task spec that cannot be turned into a :class:`Task`; the message says why."""


@dataclass
class Task:
    """Everything a run needs to know about what it trains; a user's factory returns one.

    ``train`` and ``test`` are ``torch.utils.data.Dataset`` s of ``(input, target)`` pairs;
    ``loss(model(inputs), targets)`` returns the mean loss of a batch.

    The server evaluates on ``test``: the loss always, the accuracy where the outputs are ``(N, C)``
    and the targets class indices, the perplexity (``exp`` of the loss) when ``language_model``, and
    whatever ``metrics(model, test)`` returns, a dict of named floats (called in eval mode, without
    gradients; see :func:`gapaware.common.evaluation.evaluate_task`).

    ``augment(inputs, generator)``, where given, returns each training batch's inputs augmented: the
    worker calls it on its device before the forward pass (with a ``torch.Generator`` on that device,
    seeded per worker), never on the test split (:func:`gapaware.common.augment.padded_crop_flip`
    is the paper's CIFAR augmentation).
    """

    model: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    train: Dataset
    test: Dataset
    metrics: Callable[[nn.Module, Dataset], dict[str, float]] | None = None
    language_model: bool = False
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None


def load_task(spec: str, *, seed: int = 0, data_dir: str | None = None) -> Task:
    """Build the task named by ``spec``: a name in :data:`BUILTIN_TASKS` or ``"package.module:factory"``.

    ``factory`` is called with no arguments. ``data_dir`` (default: the environment variable
    ``GAPAWARE_DATA_DIR``) is where built-in tasks that need downloaded files look for them.
    The model is built right after ``torch.manual_seed(seed)``; the caller's CPU RNG state
    is restored afterwards.
    """
    if ":" in spec:
        build = _import_factory(spec)
    elif spec in BUILTIN_TASKS:
        build = functools.partial(BUILTIN_TASKS[spec], data_dir or os.environ.get(DATA_DIR_ENV))
    else:
        raise TaskError(
            f"unknown task {spec!r}: use one of {', '.join(sorted(BUILTIN_TASKS))} "
            "or 'package.module:factory' for your own"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            task = build()
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"task {spec!r} failed to build: {type(exc).__name__}: {exc}") from exc
    _check(task, spec)
    return task


def _import_factory(spec: str) -> Callable[[], object]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TaskError(f"task spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise TaskError(
                f"cannot import module {module_name!r} for task {spec!r}: {exc}; "
                "is its folder on PYTHONPATH (or the package installed)?"
            ) from exc
        raise TaskError(f"module {module_name!r} imports something missing: {exc}") from exc
    except Exception as exc:
        raise TaskError(
            f"importing module {module_name!r} for task {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(module, attribute):
        raise TaskError(f"module {module_name!r} ({module.__file__}) has no attribute {attribute!r}")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise TaskError(f"{spec!r} is a {type(factory).__name__}, not a function that returns a Task")
    return factory


def _check(task: object, spec: str) -> None:
    if not isinstance(task, Task):
        raise TaskError(
            f"{spec!r} returned {type(task).__name__}; it must return "
            "gapaware.Task(model=..., loss=..., train=..., test=...)"
        )
    if not isinstance(task.model, nn.Module):
        raise TaskError(f"{spec!r}: Task.model is a {type(task.model).__name__}, not a torch.nn.Module")
    if not callable(task.loss):
        raise TaskError(f"{spec!r}: Task.loss is a {type(task.loss).__name__}, not callable")
    if task.augment is not None and not callable(task.augment):
        raise TaskError(f"{spec!r}: Task.augment is a {type(task.augment).__name__}, not callable")
    for field in ("train", "test"):
        value = getattr(task, field)
        if not isinstance(value, Dataset):
            raise TaskError(
                f"{spec!r}: Task.{field} is a {type(value).__name__}, not a torch.utils.data.Dataset"
            )


# --- data -----------------------------------------------------------------------------------


def _tensor_datasets(
    x: np.ndarray, y: np.ndarray, test_size: float | int
) -> tuple[TensorDataset, TensorDataset]:
    """Stratified split with the fixed :data:`SPLIT_SEED`; float32 inputs, int64 labels."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=SPLIT_SEED
    )

    def dataset(inputs: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.as_tensor(inputs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
        )

    return dataset(x_train, y_train), dataset(x_test, y_test)


def _digits(image_shape: tuple[int, ...]) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits, pixels / 16, stratified 80/20: 1437 train, 360 test."""
    digits = load_digits()
    x = (digits.data / 16.0).reshape(-1, *image_shape)
    return _tensor_datasets(x, digits.target, test_size=0.2)


def _synthetic() -> tuple[TensorDataset, TensorDataset]:
    """20-class ``make_classification`` as ALGORITHMS.md specifies, standardised with train statistics."""
    x, y = make_classification(
        n_samples=12000, n_features=40, n_informative=30, n_redundant=5, n_classes=20,
        n_clusters_per_class=2, flip_y=0.02, class_sep=1.5, random_state=SPLIT_SEED,
    )
    train, test = _tensor_datasets(x, y, test_size=2000)
    inputs = train.tensors[0]
    mean, std = inputs.mean(dim=0), inputs.std(dim=0)
    for dataset in (train, test):
        dataset.tensors[0].sub_(mean).div_(std)
    return train, test


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads numpy arrays and plain Python data, refuses every other class or function."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy array")
        return super().find_class(module, name)


def _cifar10_batch(path: Path) -> tuple[Tensor, Tensor]:
    # The CIFAR-10 "python version" batches are pickles by format. Reading them is acceptable
    # because the user points us at files they downloaded themselves; even so we unpickle
    # nothing but numpy arrays, so a tampered file cannot run code.
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        images = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32)
        return images, torch.as_tensor(batch[b"labels"], dtype=torch.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TaskError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc


def _cifar10(data_dir: str | None) -> tuple[TensorDataset, TensorDataset]:
    """The 50000/10000 CIFAR-10 split, normalised per channel (the task augments training batches).

    ``data_dir`` is the folder the archive was unpacked into (holding ``cifar-10-batches-py``)
    or ``cifar-10-batches-py`` itself.
    """
    if data_dir is None:
        raise TaskError(
            f"cifar10-resnet20 needs the CIFAR-10 files: download {CIFAR10_URL}, unpack it "
            f"into a folder and pass that folder as data_dir (or set {DATA_DIR_ENV})"
        )
    root = Path(data_dir).expanduser()
    folder = root if (root / "data_batch_1").is_file() else root / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise TaskError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Download {CIFAR10_URL} "
            f"and unpack it into {root} (tar xzf cifar-10-python.tar.gz -C {root}), which "
            f"creates {root / CIFAR10_FOLDER}"
        )
    batches = [_cifar10_batch(folder / name) for name in names]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def normalised(parts: list[tuple[Tensor, Tensor]]) -> TensorDataset:
        images = torch.cat([images for images, _ in parts]).float().div_(255).sub_(mean).div_(std)
        return TensorDataset(images, torch.cat([labels for _, labels in parts]))

    return normalised(batches[:5]), normalised(batches[5:])


class ImageFolder(Dataset):
    """An ImageNet-style folder: ``root/<class>/<image file>``, labels the indices of ``classes``.

    Each image is read with Pillow when it is indexed (nothing is held in memory), converted to
    RGB, cropped to a centred square and resized to ``size×size`` (``ImageOps.fit``), then scaled
    to [0, 1] and normalised with ImageNet's per-channel mean and standard deviation.
    """

    def __init__(self, root: Path, classes: list[str], size: int = IMAGE_FOLDER_SIZE) -> None:
        self.size = size
        self.samples = [(path, label) for label, name in enumerate(classes) if (root / name).is_dir()
                        for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, ImageOps, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                square = ImageOps.fit(image.convert("RGB"), (self.size, self.size), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise TaskError(f"{path} is not an image Pillow can read ({exc})") from exc
        pixels = torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return pixels.sub_(self._mean).div_(self._std), label


def _image_folder(data_dir: str | None) -> tuple[ImageFolder, ImageFolder, int]:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (ImageNet's layout, the validation
    images sorted into class folders); the classes are the sorted folder names under ``train``."""
    if data_dir is None:
        raise TaskError(f"image-folder needs --data-dir DIR (or {DATA_DIR_ENV}) holding DIR/train/<class>/<images> "
                        "and DIR/val/<class>/<images>")
    root = Path(data_dir).expanduser()
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise TaskError(f"image-folder: {root} has no {' or '.join(missing)} folder; it must hold "
                        "train/<class>/<images> and val/<class>/<images>")
    classes = sorted(path.name for path in (root / "train").iterdir() if path.is_dir())
    if len(classes) < 2:
        raise TaskError(f"image-folder: {root / 'train'} holds {len(classes)} class folders; a classifier needs two")
    unknown = sorted(path.name for path in (root / "val").iterdir() if path.is_dir() and path.name not in classes)
    if unknown:
        raise TaskError(f"image-folder: {root / 'val'} has class folders that train lacks: {', '.join(unknown[:5])}")
    train, test = ImageFolder(root / "train", classes), ImageFolder(root / "val", classes)
    for name, dataset in (("train", train), ("val", test)):
        if len(dataset) == 0:
            raise TaskError(f"image-folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root / name}/<class>/")
    return train, test, len(classes)


# --- models ---------------------------------------------------------------------------------


def _mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _digits_cnn() -> nn.Module:
    """Two 3x3 convolutions and a 2x2 max-pool on 1x8x8 images.

    No BatchNorm, so the parameters are the whole state the server has to hold.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers around an option-A shortcut (He et al. 2016, section 4.2).

    Where the block halves the resolution and doubles the width, the shortcut subsamples
    and pads the new channels with zeros, adding no parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return torch.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 3x32x32 images (He et al. 2016, "Deep Residual Learning", section 4.2).

    A 3x3 conv with 16 channels, three stages of three basic blocks at 16, 32 and 64
    channels (stride 2 entering stages two and three), global average pooling and a linear
    classifier: 0.27M parameters.
    """

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)  # He et al. 2015, as the paper uses

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


# --- registry -------------------------------------------------------------------------------

_loss = nn.functional.cross_entropy


def _digits_mlp_task(data_dir: str | None) -> Task:
    return Task(_mlp(64, 128, 10), _loss, *_digits((64,)))


def _digits_cnn_task(data_dir: str | None) -> Task:
    return Task(_digits_cnn(), _loss, *_digits((1, 8, 8)))


def _synthetic_task(data_dir: str | None) -> Task:
    return Task(_mlp(40, 128, 20), _loss, *_synthetic())


def _cifar10_resnet20_task(data_dir: str | None) -> Task:
    train, test = _cifar10(data_dir)  # before the model: a missing download fails fast
    return Task(ResNet20(), _loss, train, test, augment=padded_crop_flip)


def _image_folder_task(data_dir: str | None) -> Task:
    train, test, classes = _image_folder(data_dir)
    return Task(ResNet20(classes), _loss, train, test, augment=padded_crop_flip)


BUILTIN_TASKS: dict[str, Callable[[str | None], Task]] = dict(zip(
    TASK_NAMES, (_digits_mlp_task, _digits_cnn_task, _synthetic_task, _cifar10_resnet20_task, _image_folder_task),
    strict=True))
"""Built-in task name (:data:`~gapaware.common.registry.TASK_NAMES`, in its order) -> builder; a
builder takes the data folder (``None`` when unset)."""
