"""A small 2D U-Net that classifies pixels as background, boundary or interior (DeepCell).

Besides the three class logits it predicts a fourth map, the distance of each interior pixel to
its cell's boundary divided by the cell's radius (1 at the centre of a cell, 0 outside); its maxima
are the seeds that separate touching nuclei.

Everything in the network is local and translation-equivariant on the grid of its total stride:
zero-padded 3x3 convolutions, batch normalisation (a per-channel affine map in evaluation mode),
2x2 max pooling and 2x2 transposed convolutions. That is what lets tiled inference equal
whole-image inference (see :mod:`pipeline.convnet.inference`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CLASS_NAMES", "OUTPUT_NAMES", "UNet"]

CLASS_NAMES = ("background", "boundary", "interior")
OUTPUT_NAMES = (*CLASS_NAMES, "distance")


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` poolings (total stride ``2**depth``) and four output maps.

    Parameters
    ----------
    in_channels
        Image channels (1: the nuclear channel).
    base_channels
        Feature maps at full resolution; doubled at every level.
    depth
        Number of 2x2 poolings.

    Notes
    -----
    ``forward`` takes (N, in_channels, H, W) with H and W multiples of ``stride`` and returns
    (N, 4, H, W): three class logits (:data:`CLASS_NAMES`) and the distance map.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "base_channels": base_channels, "depth": depth}
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(_double_conv(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.decoders.append(_double_conv(width * 2, width))
        self.head = nn.Conv2d(base_channels, len(OUTPUT_NAMES), 1)

    @property
    def stride(self) -> int:
        """Total stride: input sizes and tile origins must be multiples of it."""
        return 2 ** self.config["depth"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits and distance map, (N, 4, H, W)."""
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders, strict=True):
            x = decoder(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)
