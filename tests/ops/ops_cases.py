"""Filters, factors and paddings shared by the reference and Triton test grids."""

from __future__ import annotations

import torch

from pipeline.ops import setup_filter

TAPS = {1: [1.0], 2: [1.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0], 6: [0.5, -1.0, 2.0, 3.0, 1.5, 0.25]}


def _filters():
    """(id, filter) pairs: identity, separable 1-D of 1/2/4/6 taps, their 2-D outer products, and asymmetric 2-D."""
    g = torch.Generator().manual_seed(1)
    out = [("none", None)]
    for t, taps in TAPS.items():
        out.append((f"sep{t}", setup_filter(taps, separable=True)))
        out.append((f"2d{t}", setup_filter(taps)))
    out.append(("asym3x2", setup_filter(torch.rand(3, 2, generator=g))))
    out.append(("asym1x4", setup_filter(torch.rand(1, 4, generator=g), normalize=False)))
    return out


FILTERS = _filters()
UPS = [1, 2, 4, (2, 1)]
DOWNS = [1, 2, 4, (1, 2)]
PADDINGS = [0, 2, -1, (3, 1), (2, -1, 0, 3)]
