"""Measure a fully convolutional network's receptive-field radius and total stride.

Tiled inference equals whole-image inference (contract 1 of docs/ARCHITECTURE.md) only when
every tile's halo is at least the receptive-field radius and tile origins lie on the network's
stride grid. Both numbers are measured here on the network itself rather than trusted from a
formula, and the training run records them in :class:`~pipeline.convnet.weights.ModelInfo`.

Receptive field
    An impulse (gradient) test. A gradient test on the trained network with random inputs can
    miss pixels: a max-pooling window passes gradient to its arg-max only, a ReLU blocks it where
    it is inactive, weights can cancel. Any of those would underestimate the radius and break
    tiling for some other input. So the test runs on a *linearised positive copy* of the
    network with the same geometry: max-pooling becomes average pooling over the same window,
    activations become the identity, every convolution averages its inputs with positive weights
    and batch normalisation (evaluation mode) becomes the identity. In that copy every path of
    the computation graph carries a strictly positive gradient (the input is positive, so
    activations applied as functions rather than modules pass gradient too; max-pooling must be a
    module), so the support of the gradient
    of an output pixel with respect to the input is exactly the set of input pixels that can
    influence it for *some* weights and inputs, an upper bound valid for any trained weights.
    The gradient of one output pixel per position modulo the stride (the receptive field of a
    strided network depends on that position) is taken on a zero-padded canvas grown until no
    support touches its border; the radius is the largest Chebyshev distance between an output
    pixel and an input pixel its gradient reaches.

Stride
    The smallest shift ``s`` such that shifting the input by ``s`` pixels (along y, then x)
    shifts the output by ``s`` pixels, away from the borders, for a random input through the
    real network in evaluation mode. The comparison runs in float64 with a tolerance near its
    rounding error (1e-9 of the output's scale), not 1e-5 in float32: in a freshly initialised
    U-Net the deepest level contributes so little that a 4-pixel shift of a depth-3 network
    already agrees to 3e-7 in float32, and a float32 test would report stride 4 instead of 8.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["linearised_copy", "measure_receptive_field_radius", "measure_stride"]

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_LINEAR = (nn.Conv2d, nn.ConvTranspose2d)
_NORMS = (nn.BatchNorm2d,)
# Output pixels (offsets modulo the stride) whose gradients are taken in one pass: a network
# of stride 16 has 256 of them, too many canvases to hold at once.
_OFFSETS_PER_PASS = 16


def _model_stride(model: nn.Module) -> int:
    stride = getattr(model, "stride", 1)
    return int(stride) if isinstance(stride, int) and stride > 0 else 1


def linearised_copy(model: nn.Module) -> nn.Module:
    """A float32 copy with the same geometry in which every dependency has a positive gradient.

    Max-pooling becomes average pooling with the same window, activations and dropout the
    identity, batch normalisation the identity, convolution weights positive averages, biases
    zero. Raises ``TypeError`` for a layer with parameters of a kind it does not know (its
    geometry could not be trusted).
    """
    clone = copy.deepcopy(model).float().eval()
    replacements = []
    for name, module in clone.named_modules():
        if isinstance(module, nn.MaxPool2d):
            replacements.append(
                (
                    name,
                    nn.AvgPool2d(
                        module.kernel_size,
                        module.stride,
                        module.padding,
                        ceil_mode=module.ceil_mode,
                        count_include_pad=True,
                    ),
                )
            )
        elif isinstance(module, _ACTIVATIONS):
            replacements.append((name, nn.Identity()))
        elif isinstance(module, _NORMS):
            replacements.append((name, nn.Identity()))
        elif isinstance(module, _LINEAR):
            with torch.no_grad():
                weight = module.weight
                if isinstance(module, nn.ConvTranspose2d):
                    fan_in = weight.shape[0] // module.groups
                else:
                    fan_in = weight[0].numel()
                weight.fill_(1.0 / fan_in)
                if module.bias is not None:
                    module.bias.zero_()
        elif not list(module.children()) and list(module.parameters(recurse=False)):
            raise TypeError(f"cannot linearise layer {name!r} of type {type(module).__name__}")
    for name, replacement in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, replacement)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


def measure_receptive_field_radius(
    model: nn.Module,
    *,
    canvas: int | None = None,
    max_canvas: int = 2048,
    in_channels: int | None = None,
) -> int:
    """Receptive-field radius (pixels, Chebyshev) of a fully convolutional 2D network.

    Parameters
    ----------
    model
        Maps (N, C, H, W) to (N, C', H, W) at the same resolution.
    canvas
        First canvas size tried (default 16 strides, at least 64); doubled while the measured
        field touches its border.
    max_canvas
        Largest canvas tried before giving up (``ValueError``).
    in_channels
        Input channels (default: ``model.config["in_channels"]`` or 1).

    Returns
    -------
    int
        The largest distance between an output pixel and an input pixel that can affect it.
    """
    stride = _model_stride(model)
    if in_channels is None:
        in_channels = int(getattr(model, "config", {}).get("in_channels", 1))
    linear = linearised_copy(model)
    size = max(canvas or 64, 16 * stride if canvas is None else 4 * stride)
    size += -size % stride
    while size <= max_canvas:
        radius, touches = _gradient_support_radius(linear, in_channels, size, stride)
        if not touches:
            return radius
        size *= 2
    raise ValueError(f"receptive field larger than a {max_canvas}-pixel canvas")


def _gradient_support_radius(
    linear: nn.Module, in_channels: int, size: int, stride: int
) -> tuple[int, bool]:
    """Radius of the gradient support of one output pixel per offset modulo the stride, and
    whether any support reaches the canvas border (then the canvas is too small)."""
    centre = (size // 2) - (size // 2) % stride
    offsets = [(dy, dx) for dy in range(stride) for dx in range(stride)]
    device = next(linear.parameters()).device
    supports = []
    for first in range(0, len(offsets), _OFFSETS_PER_PASS):
        batch = offsets[first : first + _OFFSETS_PER_PASS]
        # A positive input keeps any activation applied as a function (not a module) in its
        # positive, non-zero-gradient range too.
        inputs = torch.ones(len(batch), in_channels, size, size, device=device)
        inputs.requires_grad_(True)
        outputs = linear(inputs)
        if outputs.shape[-2:] != inputs.shape[-2:]:
            raise ValueError("the network's output must have the input's height and width")
        picked = torch.stack(
            [outputs[n, :, centre + dy, centre + dx].sum() for n, (dy, dx) in enumerate(batch)]
        )
        (gradient,) = torch.autograd.grad(picked.sum(), inputs)
        supports.append((gradient.abs().sum(dim=1) > 0).cpu())  # (N, H, W)
    support = torch.cat(supports)
    radius = 0
    touches = False
    coords = torch.arange(size)
    for n, (dy, dx) in enumerate(offsets):
        ys, xs = torch.nonzero(support[n], as_tuple=True)
        if ys.numel() == 0:
            continue
        distance = torch.maximum((ys - (centre + dy)).abs(), (xs - (centre + dx)).abs())
        radius = max(radius, int(distance.max()))
        edge = coords[[0, -1]]
        touches |= bool(torch.isin(ys, edge).any() or torch.isin(xs, edge).any())
    return radius, touches


def measure_stride(
    model: nn.Module,
    *,
    max_stride: int = 32,
    radius: int | None = None,
    tolerance: float = 1e-9,
    seed: int = 0,
    in_channels: int | None = None,
) -> int:
    """Total stride: the smallest shift of the input that shifts the output by the same amount.

    Parameters
    ----------
    model
        Fully convolutional network, evaluated in evaluation mode on a copy.
    max_stride
        Largest shift tried; ``ValueError`` if none up to it works.
    radius
        Receptive-field radius (default: measured); outputs that far from the canvas border are
        compared.
    tolerance
        Largest difference allowed between shifted and unshifted outputs (float64), relative to
        the largest output magnitude (at least 1).
    seed
        Seed of the random test input.
    in_channels
        Input channels (default: ``model.config["in_channels"]`` or 1).
    """
    if in_channels is None:
        in_channels = int(getattr(model, "config", {}).get("in_channels", 1))
    if radius is None:
        radius = measure_receptive_field_radius(model, in_channels=in_channels)
    network = copy.deepcopy(model).double().eval().cpu()
    margin = radius + max_stride + 1
    size = 2 * margin + 2 * max_stride
    size += -size % max_stride
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, in_channels, size, size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        reference = network(image)
        tolerance = tolerance * max(1.0, float(reference.abs().max()))
        for shift in range(1, max_stride + 1):
            if all(
                _shift_matches(network, image, reference, shift, axis, margin, tolerance)
                for axis in (-2, -1)
            ):
                return shift
    raise ValueError(f"no shift up to {max_stride} pixels commutes with the network")


def _shift_matches(
    network: nn.Module,
    image: torch.Tensor,
    reference: torch.Tensor,
    shift: int,
    axis: int,
    margin: int,
    tolerance: float,
) -> bool:
    shifted = network(torch.roll(image, shifts=shift, dims=axis))
    n = image.shape[axis]
    kept = slice(margin, n - margin)
    expected = reference.narrow(axis, kept.start, kept.stop - kept.start)
    found = shifted.narrow(axis, kept.start + shift, kept.stop - kept.start)
    other = -1 if axis == -2 else -2
    expected = expected.narrow(other, margin, n - 2 * margin)
    found = found.narrow(other, margin, n - 2 * margin)
    return bool((expected - found).abs().max() <= tolerance)
