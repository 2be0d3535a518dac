"""bias_act against the activations' textbook formulas, with bias along any dim, gain, alpha and clamp."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ops import ACTIVATIONS, bias_act

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805

FORMULAS = {
    "linear": lambda x, a: x,
    "relu": lambda x, a: torch.where(x > 0, x, torch.zeros_like(x)),
    "lrelu": lambda x, a: torch.where(x >= 0, x, a * x),
    "tanh": lambda x, a: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "sigmoid": lambda x, a: 1 / (1 + torch.exp(-x)),
    "elu": lambda x, a: torch.where(x > 0, x, torch.exp(x) - 1),
    "selu": lambda x, a: SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1)),
    "softplus": lambda x, a: torch.log(1 + torch.exp(x)),
    "swish": lambda x, a: x / (1 + torch.exp(-x)),
}
DEFAULT_GAIN = {name: (math.sqrt(2) if name in ("relu", "lrelu", "swish") else 1.0) for name in FORMULAS}


def test_table_lists_every_activation_with_nvlabs_defaults():
    assert set(ACTIVATIONS) == set(FORMULAS)
    for name, spec in ACTIVATIONS.items():
        assert spec.name == name
        assert spec.def_gain == pytest.approx(DEFAULT_GAIN[name])
        assert spec.def_alpha == (0.2 if name == "lrelu" else 0.0)
    with pytest.raises(AttributeError):  # frozen: layers may read it, nobody may change it
        ACTIVATIONS["lrelu"].def_gain = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("act", sorted(FORMULAS))
@pytest.mark.parametrize("dim", [0, 1, 3])
def test_defaults_match_formula(act, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3
    b = torch.randn(x.shape[dim], generator=g, dtype=torch.float64)
    shape = [-1 if i == dim else 1 for i in range(4)]
    expected = FORMULAS[act](x + b.reshape(shape), 0.2) * DEFAULT_GAIN[act]
    torch.testing.assert_close(bias_act(x, b, dim=dim, act=act), expected)


@pytest.mark.parametrize("act", sorted(FORMULAS))
def test_alpha_gain_clamp(act):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 4
    b = torch.randn(5, generator=g, dtype=torch.float64)
    expected = (FORMULAS[act](x + b.reshape(1, 5, 1), 0.05) * 0.7).clamp(-0.5, 0.5)
    y = bias_act(x, b, act=act, alpha=0.05, gain=0.7, clamp=0.5)
    torch.testing.assert_close(y, expected)
    assert y.abs().max() <= 0.5


def test_no_bias_and_dtype_and_shape():
    x = torch.randn(4, 7)
    y = bias_act(x, act="lrelu", gain=1)
    torch.testing.assert_close(y, torch.where(x >= 0, x, 0.2 * x))
    assert bias_act(x.half(), act="swish").dtype == torch.float16
    assert bias_act(x).data_ptr() == x.data_ptr()  # linear, gain 1, no bias, no clamp: nothing to do
    torch.testing.assert_close(bias_act(x, clamp=0), torch.zeros_like(x))


def test_invalid_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        bias_act(x, act="gelu")
    with pytest.raises(AssertionError):
        bias_act(x, torch.zeros(4))  # wrong length for dim 1
    with pytest.raises(AssertionError):
        bias_act(x, torch.zeros(3), dim=2)  # dim out of range
    with pytest.raises(AssertionError):
        bias_act(x, clamp=-1)
