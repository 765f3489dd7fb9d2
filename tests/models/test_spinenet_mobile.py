"""SpineNet-Mobile 49 / 49S / 49XS: Model Garden's parameter counts, widths, the output-block rule, training."""

import pytest
import torch
from torch import nn

from spinenet_fast import SpineNetMobile

# Model Garden's own SpineNetMobile (``official/vision/modeling/backbones/spinenet_mobile.py``, its SCALING_MAP, swish),
# trainable variables counted in TensorFlow; tests/convert/test_tf_mobile.py also matches its outputs.
OFFICIAL_PARAMS = {"49": 2_268_708, "49S": 975_678, "49XS": 842_456}
ENDPOINT_FILTERS = {"49": 48, "49S": 40, "49XS": 24}


@pytest.mark.parametrize("model_id", list(OFFICIAL_PARAMS))
def test_parameter_counts_and_outputs(model_id):
    model = SpineNetMobile(model_id.lower())  # any case
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == OFFICIAL_PARAMS[model_id]
    assert model.out_channels == ENDPOINT_FILTERS[model_id]
    with torch.no_grad():
        features = model.eval()(torch.randn(1, 3, 256, 128))
    assert list(features) == ["p3", "p4", "p5", "p6", "p7"]
    for level, x in zip(range(3, 8), features.values()):
        assert x.shape == (1, ENDPOINT_FILTERS[model_id], 256 // 2**level, 128 // 2**level)


def test_block_widths_resampling_and_the_output_block_rule():
    model = SpineNetMobile("49")
    block = model.blocks[3]  # level 3: 40 wide, expanded ×6, squeeze-and-excitation to 0.2 × 40
    assert block.expand.conv.weight.shape == (240, 40, 1, 1) and block.depthwise.conv.groups == 240
    assert block.se.reduce.weight.shape == (8, 240, 1, 1) and block.project.conv.weight.shape == (40, 240, 1, 1)
    resample = model.merges[8].resamples[1]  # block 8 (level 7) reads block 7 (level 5): two depthwise stride-2 steps
    assert len(resample.down) == 2 and all(step.conv.stride == (2, 2) for step in resample.down)
    assert len(model.merges[0].resamples[0].down) == 1  # block 0 (level 2) reads the level-1 initial block
    assert model.merges[3].resamples[1].upsample_factor == 2 and not model.merges[3].resamples[1].down  # L4 -> L3
    # Output blocks also sum the earlier blocks of their level and width that nothing read: only block 13 (level 5)
    # has one, block 10 (feats index 12).
    assert [merge.extra_ids for merge in model.merges] == [[]] * 13 + [[12]] + [[]] * 2
    rates = [block.drop_path.p for block in model.blocks]
    assert rates == pytest.approx([0.2 * (k + 1) / 16 for k in range(16)])


def test_trains_with_stochastic_depth_and_torch_padding():
    torch.manual_seed(0)
    model = SpineNetMobile("49XS", padding="torch", activation="relu").train()
    loss = sum(x.square().mean() for x in model(torch.randn(2, 3, 128, 128)).values())
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_id": "50"}, ValueError, r"model_id must be one of \['49', '49S', '49XS'\], got '50'"),
        ({"padding": "same"}, ValueError, "padding must be one of"),
        ({"activation": "gelu"}, ValueError, "activation must be one of"),
        ({"stochastic_depth_rate": 1.0}, ValueError, r"stochastic_depth_rate must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpineNetMobile(**kwargs)


def test_bad_images():
    with pytest.raises(ValueError, match="multiple of 128"):
        SpineNetMobile("49XS")(torch.randn(1, 3, 200, 128))
