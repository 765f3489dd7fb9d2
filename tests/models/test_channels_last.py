"""channels_last end to end: the fused SpineNet copies no activation-sized tensor (profiler count)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from spinenet_fast import SpineNet
from spinenet_fast.detection.presets import CUSTOM_SCALINGS
from spinenet_fast.ops import use_backend

from ..conftest import require_backend

BATCH = 2


def activation_copies(events, only_inside_ops: bool) -> list[tuple[str, list[int]]]:
    """``aten::copy_`` of a 4-D batch-sized tensor, with the op chain that made it."""
    found = []
    for event in events:
        if event.name != "aten::copy_" or not event.input_shapes or len(event.input_shapes[0]) != 4:
            continue
        if event.input_shapes[0][0] != BATCH:
            continue  # weights (C_out, C_in, k, k), e.g. a transposed 1×1 weight in a conv backward
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if not only_inside_ops or any(name.startswith("spinenet_fast::") for name in chain):
            found.append((" <- ".join(chain[:4]), event.input_shapes[0]))
    return found


@pytest.mark.parametrize("padding", ["torch", "tf_same"])
@pytest.mark.parametrize("backend", ["cuda", pytest.param(None, id="auto")])
def test_fused_training_step_copies_no_activation(device, backend, padding):
    require_backend(backend)
    if backend is None and device.type == "cpu":
        pytest.skip("auto on a CPU runs the whole model in the Triton interpreter (minutes); covered on a GPU")
    model = SpineNet(CUSTOM_SCALINGS["49XS-custom"], stochastic_depth_rate=0.0, fused=True, padding=padding)
    model = model.to(device, memory_format=torch.channels_last).train()
    images = torch.randn(BATCH, 3, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with use_backend(backend):
        model(images)  # warm-up: kernel compilation, autotuning
        with profile(activities=activities, record_shapes=True) as prof:
            out = model(images)
            # A loss whose gradient comes in the features' layout, as a conv head's does: the fused endpoints' backward
            # reads NHWC gradients (one of another layout, e.g. the expanded one of a plain sum, it copies once).
            sum(feature.float().square().sum() for feature in out.values()).backward()
    # On a CPU, ATen's own CPU convolutions copy for their kernels; on a GPU nothing may copy an activation.
    copies = activation_copies(prof.events(), only_inside_ops=device.type == "cpu")
    if padding == "tf_same":  # the asymmetric pad of the 3×3/s2 backward is materialised (conv pads symmetrically)
        copies = [c for c in copies if not (c[0].startswith("aten::constant_pad_nd") and "conv3x3" in c[0])]
    assert not copies, copies
    assert all(feature.is_contiguous(memory_format=torch.channels_last) for feature in out.values())
