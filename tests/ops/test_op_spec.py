"""The op glue generated from each op's spec (``ops/op_spec.py``): backends registered, schema from the stub,
prepare, tuple outputs, fake, refusal with reasons; and every fused op declared through it."""

import re

import pytest
import torch
from torch import Tensor

import spinenet_fast.ops  # noqa: F401  (declares every op)
from spinenet_fast.ops import backends, op_spec, use_backend
from spinenet_fast.ops.schema_types import TensorList

CALLS = []


def _scaled(x, factor):
    CALLS.append(("reference", x.is_contiguous()))
    return [x * factor, x.sum(0)]


def _never(x, factor):
    raise AssertionError("a backend that cannot run was run")


@op_spec.custom_op(
    "_test_spec_scaled",
    fake=lambda x, factor: [torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1:])],
    implementations={
        "reference": op_spec.Backend(_scaled),
        "cuda": op_spec.Backend(_never, lambda x, factor: [f"factor {factor} is not 3"] if factor != 3 else []),
    },
    auto_order=("cuda", "triton", "reference"),
    prepare=lambda x, factor: (x.contiguous(), factor),
)
def _scaled_op(x: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """A toy op: ``(x·factor, Σ_0 x)``."""


@op_spec.custom_op(
    "_test_spec_list",
    fake=lambda x: [torch.empty_like(x)],
    implementations={"reference": op_spec.Backend(lambda x: [x + 1])},
)
def _list_op(x: Tensor) -> TensorList:
    """A toy op returning a list."""


def test_the_stub_gives_the_schema_and_the_docstring():
    schema = str(torch.ops.spinenet_fast._test_spec_scaled.default._schema)
    assert schema == "spinenet_fast::_test_spec_scaled(Tensor x, float factor) -> (Tensor, Tensor)"
    assert _scaled_op.__doc__ == "A toy op: ``(x·factor, Σ_0 x)``."


def test_prepared_arguments_reach_the_chosen_backend_and_tuples_come_back():
    CALLS.clear()
    x = torch.randn(4, 3).t()  # not contiguous: prepare makes it so
    out = _scaled_op(x, 2.0)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], x * 2)
    torch.testing.assert_close(out[1], x.sum(0))
    assert CALLS == [("reference", True)]
    assert isinstance(_list_op(x), list)


def test_backends_are_registered_with_their_reasons_and_order():
    assert backends.implemented("_test_spec_scaled") == ("reference", "cuda")
    reasons = backends.reasons_by_backend("_test_spec_scaled", torch.ones(1), 2.0)
    assert reasons == {"reference": [], "triton": ["no triton implementation of _test_spec_scaled"],
                       "cuda": ["factor 2.0 is not 3"]}  # fmt: skip
    with backends.gpu_auto_order_on_cpu():  # auto on a GPU: cuda first, where its reasons allow
        assert backends.choose("_test_spec_scaled", torch.ones(1), 3.0) == "cuda"
        assert backends.choose("_test_spec_scaled", torch.ones(1), 2.0) == "reference"


def test_an_explicit_backend_that_cannot_run_is_refused_with_every_reason():
    with use_backend("cuda"), pytest.raises(RuntimeError, match=re.escape("cuda: factor 2.0 is not 3")):
        _scaled_op(torch.ones(2, 2), 2.0)


def test_the_fake_and_opcheck():
    torch.library.opcheck(_scaled_op, (torch.randn(3, 5), 1.5))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        y, s = _scaled_op(torch.empty(3, 5), 1.5)
    assert y.shape == (3, 5) and s.shape == (5,)


def test_kernel_and_extension_handles_resolve_at_their_first_call():
    handle = op_spec.kernel("not_a_module", "f")  # nothing imported yet: Triton may be absent
    assert handle.__name__ == "not_a_module.f"
    with pytest.raises(ModuleNotFoundError):
        handle()
    assert op_spec.extension("ext_merge").__name__ == "ext_merge"


FUSED_OPS = (
    "bn_act_maxpool", "bn_act_maxpool_backward", "bn_act_maxpool_backward_into", "bn_finalize", "bn_finalize_backward",
    "conv1x1_bn_backward", "conv1x1_bn_forward", "conv1x1_bn_pair_backward", "conv1x1_bn_stats",
    "conv1x1_bn_stats_backward", "conv1x1_bn_stats_backward_into", "conv1x1_bn_stats_into", "conv3x3_bn_backward",
    "conv3x3_bn_forward", "conv3x3_bn_levels_backward", "conv3x3_bn_levels_forward", "conv3x3_bn_stats",
    "conv3x3_bn_stats_backward", "conv3x3_bn_stats_backward_into", "conv3x3_bn_stats_into", "conv3x3_levels",
    "conv3x3_levels_backward", "expand_merge_affine", "expand_merge_affine_backward", "expand_merge_backward",
    "expand_merge_forward", "match_anchors", "merge", "merge_backward", "merge_backward_into",
    "pooled_conv1x1_bn_forward", "pooled_conv1x1_bn_stats_into", "retinanet_loss", "retinanet_loss_backward",
)  # fmt: skip


@pytest.mark.parametrize("name", FUSED_OPS)
def test_every_fused_op_is_declared_through_its_spec(name):
    """Each op: a custom op of that name, a reference backend (the oracle), a cuda backend, and a fake."""
    from torch._library.simple_registry import singleton

    assert hasattr(torch.ops.spinenet_fast, name)
    assert {"reference", "cuda"} <= set(backends.implemented(name))
    assert singleton.find(f"spinenet_fast::{name}").fake_impl.kernel is not None


def test_the_list_of_fused_ops_is_complete():
    declared = {name for name in backends._registry if not name.startswith("_test_")}
    assert declared == set(FUSED_OPS)
