"""DiffAugment: each operation's statistics, differentiability, and the policy."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment import AugmentConfig, DiffAugment, build_augment
from pipeline.augment.diffaugment import color, cutout, translation


def test_color_statistics() -> None:
    torch.manual_seed(0)
    # A grey constant image: saturation and contrast leave it alone, brightness adds U(-1/2, 1/2).
    grey = torch.zeros(4000, 3, 4, 4)
    shift = color(grey)[:, 0, 0, 0]
    assert shift.min() >= -0.5 and shift.max() <= 0.5
    assert shift.std().item() == pytest.approx((1 / 12) ** 0.5, rel=0.05)
    # Saturation scales the deviation from the channel mean by U(0, 2); contrast by U(1/2, 3/2): mean gain 1.
    x = torch.randn(4000, 3, 4, 4)
    y = color(x)
    dev_in = x - x.mean(dim=1, keepdim=True)
    dev_out = y - y.mean(dim=1, keepdim=True)
    gain = dev_out.flatten(1).norm(dim=1) / dev_in.flatten(1).norm(dim=1)
    assert gain.min() >= 0 and gain.max() <= 3.0
    assert gain.mean().item() == pytest.approx(1.0, abs=0.05)


def test_translation_is_an_integer_shift_with_zero_fill() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 1, 16, 16) + 1  # strictly positive: zero fill is visible
    y = translation(x)
    for xi, yi in zip(x, y, strict=True):
        matched = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(xi)
                src = xi[:, max(0, -dy) : 16 - max(0, dy), max(0, -dx) : 16 - max(0, dx)]
                shifted[:, max(0, dy) : 16 - max(0, -dy), max(0, dx) : 16 - max(0, -dx)] = src
                matched |= torch.equal(yi, shifted)
        assert matched


def test_cutout_zeroes_one_square_of_half_size() -> None:
    torch.manual_seed(0)
    y = cutout(torch.ones(500, 3, 16, 16))
    zero = (y[:, 0] == 0).float()
    area = zero.sum(dim=(1, 2))
    assert area.max() == 64  # an 8x8 square when it lies fully inside
    assert area.min() >= 16  # clipped by a corner: at least a quarter remains
    rows, cols = zero.amax(dim=2), zero.amax(dim=1)
    assert ((rows.sum(1) * cols.sum(1)) == area).all()  # rectangular


def test_policy_order_gradcheck_and_config() -> None:
    aug = build_augment(AugmentConfig(kind="diffaugment", policy="color, cutout"))
    assert isinstance(aug, DiffAugment) and aug.policy == ["color", "cutout"]
    full = DiffAugment()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return full(t)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        DiffAugment(["colour"])
