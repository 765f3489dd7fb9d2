"""The tolerance rule of fused_ops.md §5."""

import torch


def max_abs_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return (x.float() - reference.float()).abs().max().item()


def assert_low_precision_rule(
    fused: torch.Tensor, reference_fp32: torch.Tensor, eager_same_dtype: torch.Tensor
) -> None:
    """err(fused) <= 2·err(eager in the same dtype) + 1e-2, both measured against fp32."""
    fused_error = max_abs_error(fused, reference_fp32)
    eager_error = max_abs_error(eager_same_dtype, reference_fp32)
    assert fused_error <= 2 * eager_error + 1e-2, f"fused error {fused_error} vs eager error {eager_error}"


def assert_close_by_dtype(fused: torch.Tensor, reference_fp32: torch.Tensor, eager_same_dtype: torch.Tensor) -> None:
    """fp32: ~1e-5. Lower precision: the rule above."""
    if fused.dtype == torch.float32:
        torch.testing.assert_close(fused, reference_fp32, rtol=1e-5, atol=1e-5)
    else:
        assert_low_precision_rule(fused, reference_fp32, eager_same_dtype)
