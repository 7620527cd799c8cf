"""Measured receptive-field radius and stride against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.convnet.receptive_field import (
    linearised_copy,
    measure_receptive_field_radius,
    measure_stride,
)
from pipeline.convnet.unet import UNet


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _two_convs() -> nn.Module:
    # Each 3x3 convolution reaches one pixel further: radius 1 + 1 = 2, stride 1.
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU()
    )


class _ConvPoolConv(nn.Module):
    """conv 3x3, max-pool 2x2, conv 3x3, transposed conv 2x2 stride 2 (back to full size).

    By hand, for output pixel p (1D; 2D is the product): the transposed convolution reads the
    half-resolution pixel floor(p / 2), whose 2-pixel cell is [p, p + 1] (p even) or
    [p - 1, p] (p odd); the half-resolution conv adds one half-resolution pixel = 2 input pixels
    on each side: [p - 2, p + 3] or [p - 3, p + 2]; the full-resolution conv adds 1:
    [p - 3, p + 4] or [p - 4, p + 3]. Radius 4 (either parity), stride 2.
    """

    stride = 2

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.second(self.pool(torch.relu(self.first(x))))))


def unet_radius(depth: int) -> int:
    """Analytic receptive-field radius of :class:`UNet` (two 3x3 convolutions per level).

    Work in input pixels; a level-l pixel covers a cell of 2**l input pixels and a 3x3
    convolution at level l reaches 2**l input pixels further on each side.
    Encoder: e_0 = 2 (two convolutions), pooling keeps the reach beyond the (larger) cell,
    e_l = e_(l-1) + 2 * 2**l, so e_l = 2**(l+2) - 2.
    Decoder: the 2x2 stride-2 transposed convolution gives a level-l pixel its parent's cell,
    which overhangs its own cell by 2**l on one side; concatenated with the skip (reach e_l,
    smaller) and two convolutions: d_l = d_(l+1) + 2**l + 2 * 2**l, with d_depth = e_depth.
    Radius = d_0 = 2**(depth+2) - 2 + 3 * (2**depth - 1) = 7 * 2**depth - 5
    (depth 1: 9, 2: 23, 3: 51), reached when the overhangs of all levels lie on one side.
    """
    return 7 * 2**depth - 5


def test_two_convolutions_radius_two_stride_one():
    model = _two_convs()
    assert measure_receptive_field_radius(model) == 2
    assert measure_stride(model, max_stride=4) == 1


def test_conv_pool_conv_radius_by_hand():
    model = _ConvPoolConv()
    radius = measure_receptive_field_radius(model, in_channels=1)
    assert radius == 4
    assert measure_stride(model, radius=radius, max_stride=8, in_channels=1) == 2


@pytest.mark.parametrize("depth", [2, 3])
def test_unet_radius_and_stride(depth):
    # The geometry does not depend on the widths: narrow networks keep the test fast. Seeded:
    # about one random 4-channel net in 200 has a layer whose every unit is dead, so that
    # their output is constant and any shift seems to match (seeds 142 and 298 of 40-400).
    torch.manual_seed(depth)
    model = UNet(base_channels=4, depth=depth)
    radius = measure_receptive_field_radius(model)
    assert radius == unet_radius(depth)
    assert measure_stride(model, radius=radius, max_stride=16) == 2**depth == model.stride


def test_measurement_leaves_the_model_alone():
    model = UNet(base_channels=4, depth=2).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    measure_receptive_field_radius(model)
    measure_stride(model, max_stride=8)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_gradient_of_real_network_stays_inside_measured_field():
    # Any dependency the trained network has must lie inside the structural field.
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2).eval()
    radius = measure_receptive_field_radius(model)
    image = torch.rand(1, 1, 128, 128, requires_grad=True)
    model(image)[0, :, 64, 64].sum().backward()
    ys, xs = torch.nonzero(image.grad[0, 0], as_tuple=True)
    assert int(torch.maximum((ys - 64).abs(), (xs - 64).abs()).max()) <= radius


def test_unknown_parameterised_layer_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2))
    with pytest.raises(TypeError, match="cannot linearise"):
        linearised_copy(model)
