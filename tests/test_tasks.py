"""Built-in and user tasks, the batch stream and evaluation (gapaware.common.tasks/data/evaluation)."""
import math
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gapaware.common.data import batches, one_pass
from gapaware.common.evaluation import evaluate
from gapaware.common.tasks import (
    BUILTIN_TASKS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    Task,
    TaskError,
    load_task,
)

LOCAL_TASKS = ["digits-mlp", "digits-cnn", "synthetic"]  # need no download
FACTORY_MODULE = "gapaware_test_factories"


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def one_thread():
    """Small convolutions run fastest on one thread and do not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- built-in tasks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_builtin_task_loads_and_runs(name):
    task = load_task(name)
    assert isinstance(task, Task)
    assert isinstance(task.train, TensorDataset) and isinstance(task.test, TensorDataset)
    inputs, targets = task.train[:5]
    assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
    loss = task.loss(task.model(inputs), targets)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_same_seed_same_parameters_other_seed_different(name):
    first = flat_parameters(load_task(name, seed=3).model)
    assert torch.equal(first, flat_parameters(load_task(name, seed=3).model))
    assert not torch.equal(first, flat_parameters(load_task(name, seed=4).model))


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_split_does_not_depend_on_seed(name):
    a, b = load_task(name, seed=0), load_task(name, seed=1)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert all(torch.equal(s, t) for s, t in zip(x.tensors, y.tensors))


def test_load_task_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_task("digits-mlp", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_digits_split_is_1437_360_stratified_and_scaled():
    task = load_task("digits-mlp")
    (x_train, y_train), (x_test, y_test) = task.train.tensors, task.test.tensors
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
    assert 0 <= x_train.min() and x_train.max() == 1.0
    train_share = torch.bincount(y_train, minlength=10) / len(y_train)
    test_share = torch.bincount(y_test, minlength=10) / len(y_test)
    assert (train_share - test_share).abs().max() < 0.01
    cnn = load_task("digits-cnn")
    assert cnn.train.tensors[0].shape == (1437, 1, 8, 8)
    assert torch.equal(cnn.train.tensors[0].flatten(1), x_train)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cnn.model.modules())


def test_synthetic_is_10000_2000_with_40_features_20_classes_standardised():
    task = load_task("synthetic")
    (x_train, y_train), (x_test, y_test) = task.train.tensors, task.test.tensors
    assert x_train.shape == (10000, 40) and x_test.shape == (2000, 40)
    assert set(y_train.tolist()) == set(range(20)) == set(y_test.tolist())
    assert x_train.mean(dim=0).abs().max() < 1e-4
    assert (x_train.std(dim=0) - 1).abs().max() < 1e-4
    assert task.model(x_test[:2]).shape == (2, 20)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(TaskError) as error:
        load_task("digits-rnn")
    assert all(name in str(error.value) for name in BUILTIN_TASKS)
    assert "package.module:factory" in str(error.value)


# --- CIFAR-10 -------------------------------------------------------------------------------


def write_fake_cifar(root, images_per_batch=2):
    """CIFAR-10 python batches in the real format: dicts with bytes keys, 3072 uint8 per image (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = []
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.zeros((images_per_batch, 3072), dtype=np.uint8)
        data[0, 0] = 255  # red, top-left pixel of the first image
        batch_labels = [(i + j) % 10 for j in range(images_per_batch)]
        labels.append(batch_labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": batch_labels, b"data": data}, f)
    return labels


def test_cifar_without_files_says_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(TaskError) as error:
        load_task("cifar10-resnet20", data_dir=str(tmp_path))
    message = str(error.value)
    assert CIFAR10_URL in message and str(tmp_path) in message and "data_batch_1" in message
    monkeypatch.delenv("GAPAWARE_DATA_DIR", raising=False)
    with pytest.raises(TaskError, match="GAPAWARE_DATA_DIR") as error:
        load_task("cifar10-resnet20")
    assert CIFAR10_URL in str(error.value)


def test_cifar_reads_python_batches(tmp_path, monkeypatch):
    labels = write_fake_cifar(tmp_path)
    monkeypatch.setenv("GAPAWARE_DATA_DIR", str(tmp_path))
    task = load_task("cifar10-resnet20", seed=1)
    (x_train, y_train), (x_test, y_test) = task.train.tensors, task.test.tensors
    assert x_train.shape == (10, 3, 32, 32) and x_test.shape == (2, 3, 32, 32)
    assert y_train.tolist() == sum(labels[:5], []) and y_test.tolist() == labels[5]
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    assert torch.allclose(x_train[0, :, 0, 0], (torch.tensor([1.0, 0, 0]) - mean) / std)
    assert torch.allclose(x_train[1, :, 5, 7], -mean / std)
    assert task.model(x_test).shape == (2, 10)
    assert sum(p.numel() for p in task.model.parameters()) == 269_722  # ResNet-20, option A
    same = load_task("cifar10-resnet20", seed=1, data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(flat_parameters(task.model), flat_parameters(same.model))


def test_cifar_refuses_a_pickle_that_is_not_data(tmp_path):
    write_fake_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)
    with pytest.raises(TaskError, match="test_batch is not a CIFAR-10 python batch"):
        load_task("cifar10-resnet20", data_dir=str(tmp_path))


# --- user factories -------------------------------------------------------------------------


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        from gapaware import Task

        def data():
            return TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))

        def make():
            return Task(nn.Linear(3, 2), nn.functional.cross_entropy, data(), data())

        def returns_dict():
            return {"model": nn.Linear(3, 2)}

        def model_is_a_function():
            return Task(make, nn.functional.cross_entropy, data(), data())

        def loss_is_a_number():
            return Task(nn.Linear(3, 2), 0.5, data(), data())

        def test_is_a_list():
            return Task(nn.Linear(3, 2), nn.functional.cross_entropy, data(), [(1, 2)])

        def needs_argument(width):
            return make()

        def raises():
            raise RuntimeError("no data here")

        not_callable = 3
    """))
    (tmp_path / "gapaware_test_broken_import.py").write_text("import gapaware_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield FACTORY_MODULE
    for name in (FACTORY_MODULE, "gapaware_test_broken_import"):
        sys.modules.pop(name, None)


def test_factory_builds_a_seeded_task(factories):
    def parameters(seed):
        return flat_parameters(load_task(f"{factories}:make", seed=seed).model)

    assert isinstance(load_task(f"{factories}:make").model, nn.Linear)
    assert torch.equal(parameters(5), parameters(5))
    assert not torch.equal(parameters(5), parameters(6))


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("nope", "has no attribute 'nope'"),
        ("not_callable", "is a int, not a function"),
        ("returns_dict", "returned dict; it must return gapaware.Task"),
        ("model_is_a_function", "Task.model is a function, not a torch.nn.Module"),
        ("loss_is_a_number", "Task.loss is a float, not callable"),
        ("test_is_a_list", "Task.test is a list, not a torch.utils.data.Dataset"),
        ("needs_argument", "failed to build: TypeError"),
        ("raises", "failed to build: RuntimeError: no data here"),
    ],
)
def test_factory_failures_explain_themselves(factories, attribute, expected):
    with pytest.raises(TaskError) as error:
        load_task(f"{factories}:{attribute}")
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gapaware_no_such_module:make", "cannot import module 'gapaware_no_such_module'"),
        ("gapaware.no_such_module:make", "cannot import module 'gapaware.no_such_module'"),
        ("gapaware_test_broken_import:make", "imports something missing: No module named 'gapaware_no_such_dep"),
        ("gapaware_test_factories:", "must look like 'package.module:factory'"),
        (":make", "must look like 'package.module:factory'"),
    ],
)
def test_bad_module_specs_explain_themselves(factories, spec, expected):
    with pytest.raises(TaskError) as error:
        load_task(spec)
    assert expected in str(error.value)


# --- batches --------------------------------------------------------------------------------


class ListDataset(Dataset):
    """Not a TensorDataset, so it takes the DataLoader path."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_batches_cover_every_example_once_per_epoch():
    dataset = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    stream = batches(dataset, 4, seed=0)
    epochs = [take(stream, 3) for _ in range(3)]  # 4 + 4 + 2
    orders = []
    for epoch in epochs:
        assert [len(targets) for _, targets in epoch] == [4, 4, 2]
        order = torch.cat([targets for _, targets in epoch])
        assert sorted(order.tolist()) == list(range(10))
        assert all(torch.equal(inputs.squeeze(1), targets.float()) for inputs, targets in epoch)
        orders.append(order.tolist())
    assert orders[0] != orders[1]  # a fresh permutation each epoch


def test_batches_are_reproducible_and_the_same_on_both_paths():
    inputs, targets = torch.randn(23, 3), torch.arange(23)
    fast = take(batches(TensorDataset(inputs, targets), 5, seed=7), 12)
    again = take(batches(TensorDataset(inputs, targets), 5, seed=7), 12)
    generic = take(batches(ListDataset(inputs, targets), 5, seed=7), 12)
    other = take(batches(TensorDataset(inputs, targets), 5, seed=8), 12)
    for (x, y), (x2, y2), (x3, y3) in zip(fast, again, generic):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x, x3) and torch.equal(y, y3)
    assert any(not torch.equal(y, y4) for (_, y), (_, y4) in zip(fast, other))


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batches_reject_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch size"):
        batches(TensorDataset(torch.zeros(3)), batch_size, seed=0)


def test_one_pass_keeps_dataset_order():
    dataset = ListDataset(torch.arange(7.0), torch.arange(7))
    assert [targets.tolist() for _, targets in one_pass(dataset, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


# --- evaluation -----------------------------------------------------------------------------


def test_evaluate_gives_exact_loss_and_accuracy():
    # Logits = 2 * one-hot(input) for inputs 0..4 of 5 classes, so the model is right when
    # the target is the input, with cross-entropy log(1 + 4 e^-2), and 2 more when wrong.
    classes, scale = 5, 2.0
    model = nn.Embedding(classes, classes)
    nn.init.eye_(model.weight)
    model.weight.data.mul_(scale)
    inputs = torch.arange(classes)
    right_loss = math.log(1 + (classes - 1) * math.exp(-scale))
    wrong_loss = right_loss + scale
    model.train()
    loss, accuracy = evaluate(model, nn.functional.cross_entropy, TensorDataset(inputs, inputs), batch_size=2)
    assert accuracy == 1.0 and loss == pytest.approx(right_loss, rel=1e-5)
    assert model.training

    wrong_targets = torch.tensor([0, 1, 2, 0, 0])
    model.eval()
    dataset = ListDataset(inputs, wrong_targets)
    loss, accuracy = evaluate(model, nn.functional.cross_entropy, dataset, batch_size=3)
    assert accuracy == pytest.approx(3 / 5)
    assert loss == pytest.approx((3 * right_loss + 2 * wrong_loss) / 5, rel=1e-5)
    assert not model.training


def test_evaluate_restores_each_submodule_mode_and_needs_no_grad():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()

    def loss(outputs, targets):
        assert not torch.is_grad_enabled() and not model[1].training
        return nn.functional.cross_entropy(outputs, targets)

    evaluate(model, loss, TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64)))
    assert model.training and model[0].training and not model[1].training


# --- one real outcome -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_plain_sgd_learns_digits(name, one_thread):
    task = load_task(name, seed=0)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    stream = batches(task.train, 32, seed=0)
    for _ in range(500):
        inputs, targets = next(stream)
        optimizer.zero_grad()
        task.loss(task.model(inputs), targets).backward()
        optimizer.step()
    _, accuracy = evaluate(task.model, task.loss, task.test)
    assert accuracy >= 0.9
