import pytest
import torch
from torch import nn

from training.config import NiNConfig
from training.model import NiN, init_weights

D2L_SHAPES = [(96, 54, 54), (96, 26, 26), (256, 26, 26), (256, 12, 12), (384, 12, 12), (384, 5, 5),
              (384, 5, 5), (10, 5, 5), (10, 1, 1), (10,)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_is_the_textbook_network():
    model = NiN()
    assert n_params(model) == 1_992_166
    x = torch.zeros(2, 1, 224, 224)
    shapes = []
    for layer in model.net:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == D2L_SHAPES
    assert not any(isinstance(m, (nn.LazyConv2d, nn.BatchNorm2d)) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, params",
    [
        (dict(num_1x1=0), 1_992_166 - 2 * (9_312 + 65_792 + 147_840 + 110)),
        (dict(num_1x1=1), 1_992_166 - (9_312 + 65_792 + 147_840 + 110)),
        (dict(num_1x1=3), 1_992_166 + (9_312 + 65_792 + 147_840 + 110)),
        # BatchNorm: conv biases go, 2 parameters per channel come (none after the classifier conv).
        (dict(batch_norm=True), 1_992_166 + 3 * (96 + 256 + 384) + 2 * 10),
    ],
)
def test_variants_parameter_counts_and_output(kwargs, params):
    model = NiN(NiNConfig(**kwargs)).eval()
    assert n_params(model) == params
    out = model(torch.randn(3, 1, 224, 224))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_width_multiplier_scales_hidden_channels_only():
    model = NiN(NiNConfig(width=0.5))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[::3]] == [48, 128, 192, 10]


@pytest.mark.parametrize("bad", [dict(num_1x1=4), dict(dropout=1.0), dict(width=0), dict(num_classes=3)])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        NiNConfig(**bad)


def test_config_round_trips_through_a_dict():
    cfg = NiNConfig(batch_norm=True, num_1x1=1, width=0.5)
    assert NiNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        NiNConfig.from_dict({**cfg.to_dict(), "colour": True})


def test_xavier_init_zeroes_biases_and_bounds_weights():
    model = NiN()
    init_weights(model, "xavier")
    conv = model.net[0][0]
    bound = (6 / (1 * 121 + 96 * 121)) ** 0.5
    assert conv.weight.abs().max() <= bound and (conv.bias == 0).all()
