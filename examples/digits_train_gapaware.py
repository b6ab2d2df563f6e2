"""A typical PyTorch training script: a DataLoader, mixed precision with a GradScaler, gradient
clipping and SGD with momentum, on scikit-learn's digits. digits_train_gapaware.py is the same script
trained by a gapaware parameter server: `diff digits_train.py digits_train_gapaware.py` shows the
lines that change (README, "Your own training loop")."""
import argparse

import gapaware
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(batch_size: int) -> tuple[DataLoader, DataLoader]:
    inputs, targets = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(inputs / 16.0, targets, test_size=0.25, random_state=0)
    train = TensorDataset(torch.tensor(train_x, dtype=torch.float32), torch.tensor(train_y))
    test = TensorDataset(torch.tensor(test_x, dtype=torch.float32), torch.tensor(test_y))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=512)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            correct += (model(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
    model.train()
    return {"accuracy": correct / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:7070")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = digits(args.batch_size)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = gapaware.RemoteOptimizer(model, server=args.server, evaluate=lambda m: evaluate(m, test), every=50)
    scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu")
    while not optimizer.finished:
        for inputs, targets in train:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
            scaler.step(optimizer)
            scaler.update()
    optimizer.close()
    print(evaluate(model, test))


if __name__ == "__main__":
    main()
