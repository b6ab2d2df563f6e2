"""Data augmentation on whole batches with plain torch operations (no torchvision needed).

The paper's CIFAR-10 setting (Barkai, Hakimi and Schuster, ICLR 2020, following He et al. 2016,
section 4.2) trains on images padded by 4 pixels on each side, randomly cropped back to their size
and flipped horizontally with probability 1/2. Done per batch on the worker's device, it is a few
indexing operations: no per-image Python loop, no data-loader process.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional


def padded_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """``images`` ``(N, C, H, W)`` zero-padded by ``padding`` on each side, each cropped back to
    ``H×W`` at a uniformly random offset and mirrored left-right with probability 1/2; a new tensor.

    The padding is zeros of the images as given: for normalised images that is the mean colour.
    ``generator`` (on the images' device) draws the offsets and flips, so a worker's stream of
    augmentations is reproducible.
    """
    n, _, height, width = images.shape
    device = images.device
    padded = functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    rows = top + torch.arange(height, device=device)
    columns = left + torch.arange(width, device=device)
    flipped = torch.rand((n, 1), generator=generator, device=device) < 0.5
    columns = torch.where(flipped, columns.flip(1), columns)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    # Indices on dims 0, 2 and 3 around a slice: the result is (N, H, W, C).
    return padded[batch, :, rows.view(n, height, 1), columns.view(n, 1, width)].permute(0, 3, 1, 2).contiguous()
