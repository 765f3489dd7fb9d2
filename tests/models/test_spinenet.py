"""The eager SpineNet backbone against architecture.md §2–§8."""

import functools
import math

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from spinenet_fast import SCALING_MAP, SpineNet
from spinenet_fast.models.blocks import Bottleneck
from spinenet_fast.models.spinenet import SPINENET_BLOCK_SPECS

BACKBONE_PARAMS = {
    "49S": 9_089_215,
    "49": 21_831_488,
    "96": 36_262_976,
    "143": 60_247_616,
    "143L": 100_796_257,
    "190": 126_587_664,
}


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def spinenet49s():
    torch.manual_seed(0)
    return SpineNet("49S", stochastic_depth_rate=0.0).eval()


@pytest.mark.parametrize("model_id", list(BACKBONE_PARAMS))
def test_parameter_count_and_extra_edge(model_id):
    model = SpineNet(model_id)
    assert trainable_params(model) == BACKBONE_PARAMS[model_id]
    # feats[11] is block 10's output; the rule adds it, and only it, into block 13 (P5).
    assert model.extra_edges == [(11, 13)]


def test_official_ids_are_all_tested():
    assert set(SCALING_MAP) == set(BACKBONE_PARAMS)


def test_endpoint_shapes_and_attributes():
    model = SpineNet("49")
    out = model(torch.randn(1, 3, 256, 384))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    for level, (name, feat) in zip(range(3, 8), out.items()):
        assert feat.shape == (1, 256, 256 // 2**level, 384 // 2**level), name
    assert model.out_channels == 256
    assert model.strides == [8, 16, 32, 64, 128]
    assert model.size_divisibility == 128
    assert model.feature_info.channels() == [256] * 5
    assert model.feature_info.reduction() == [8, 16, 32, 64, 128]
    assert model.feature_info.module_name(0) == "endpoints.p3"


def test_level_subset_and_custom_scaling():
    scaling = {"filter_size_scale": 0.25, "resample_alpha": 0.5, "block_repeats": 1, "endpoints_num_filters": 32}
    model = SpineNet(scaling, min_level=4, max_level=6)
    out = model(torch.randn(2, 3, 128, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p4": (2, 32, 8, 8),
        "p5": (2, 32, 4, 4),
        "p6": (2, 32, 2, 2),
    }
    assert model.model_id == "custom"


def test_every_parameter_gets_a_gradient():
    model = SpineNet("49S", stochastic_depth_rate=0.0).train()
    out = model(torch.randn(2, 3, 128, 128))
    sum((feat * torch.randn_like(feat)).sum() for feat in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_init_and_batchnorm_defaults():
    model = SpineNet("49S")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == 0.01 and bn.eps == 1e-3 for bn in bns)
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is None for conv in convs)
    big = max(convs, key=lambda c: c.weight.numel())
    fan_in = big.in_channels * big.kernel_size[0] * big.kernel_size[1]
    std = math.sqrt(1 / fan_in) / 0.87962566103423978
    assert big.weight.abs().max() <= 2 * std
    # A normal truncated at ±2σ has standard deviation 0.8796·σ, i.e. sqrt(1 / fan_in).
    assert big.weight.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.05)


def test_norm_layer_factories():
    frozen = SpineNet("49S", norm_layer=FrozenBatchNorm2d)
    assert all(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules() if "BatchNorm" in type(m).__name__)
    assert frozen.stem.conv.bn.eps == 1e-3
    assert trainable_params(frozen) < BACKBONE_PARAMS["49S"]
    frozen(torch.randn(1, 3, 128, 128))

    sync = SpineNet("49S", norm_layer=nn.SyncBatchNorm, bn_momentum=0.1).train()
    assert all(m.momentum == 0.1 for m in sync.modules() if isinstance(m, nn.SyncBatchNorm))
    sync(torch.randn(2, 3, 128, 128))  # no process group: behaves like BatchNorm

    custom = SpineNet("49S", norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-5))
    assert custom.stem.conv.bn.eps == 1e-5 and custom.stem.conv.bn.momentum == 0.01


def test_stochastic_depth_rates_per_block():
    model = SpineNet("96", stochastic_depth_rate=0.3)
    for group in model.init_groups:
        assert all(block.drop_path.p == 0 for block in group)
    for k, group in enumerate(model.groups, start=1):
        assert len(group) == 2
        assert all(block.drop_path.p == pytest.approx(0.3 * k / len(SPINENET_BLOCK_SPECS)) for block in group)
    assert SpineNet("49S").groups[-1][0].drop_path.p == pytest.approx(0.2)
    assert SpineNet("49S", stochastic_depth_rate=0.0).groups[-1][0].drop_path.p == 0


def test_stochastic_depth_is_identity_in_eval(spinenet49s):
    dropping = SpineNet("49S", stochastic_depth_rate=0.9).eval()
    dropping.load_state_dict(spinenet49s.state_dict())
    x = torch.randn(2, 3, 128, 128)
    for a, b in zip(dropping(x).values(), spinenet49s(x).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stochastic_depth_preserves_expectation_in_train():
    block = Bottleneck(8, 2, nn.BatchNorm2d, "relu", "torch", drop_rate=0.4).train()
    branch = torch.ones(20_000, 8, 1, 1)
    dropped = block.drop_path(branch)
    kept = dropped[:, 0, 0, 0] != 0
    # Whole samples are dropped or kept (row mode), kept ones scaled by 1 / (1 - rate).
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 1 / 0.6))
    assert torch.all(dropped[~kept] == 0)
    sigma = math.sqrt(0.4 * 0.6 / 20_000) / 0.6
    assert abs(dropped.mean().item() - 1.0) < 4 * sigma


def test_state_dict_round_trip(spinenet49s):
    fresh = SpineNet("49S", stochastic_depth_rate=0.0).eval()
    fresh.load_state_dict(spinenet49s.state_dict())
    x = torch.randn(1, 3, 128, 256)
    for a, b in zip(fresh(x).values(), spinenet49s(x).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fx_symbolic_trace(spinenet49s):
    traced = torch.fx.symbolic_trace(spinenet49s)
    x = torch.randn(1, 3, 128, 128)
    for a, b in zip(traced(x).values(), spinenet49s(x).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="H=100"):
        traced(torch.randn(1, 3, 100, 128))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = SpineNet("49S", stochastic_depth_rate=0.0).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 128, 128)
    out = compiled(x)
    sum(feat.sum() for feat in out.values()).backward()
    expected = SpineNet("49S", stochastic_depth_rate=0.0).train()
    expected.load_state_dict(model.state_dict())
    # Train-mode BN normalises with batch statistics, so the outputs depend on the weights and x only.
    ref_out = expected(x)
    for a, b in zip(out.values(), ref_out.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())
