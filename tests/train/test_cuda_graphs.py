"""``--cuda-graphs``: graphed backbone + head steps equal eager steps; gradient accumulation survives replays."""

import copy

import pytest
import torch

from spinenet_fast.detection.presets import build_detector
from spinenet_fast.ops import use_backend
from spinenet_fast.train.__main__ import main as train_main
from spinenet_fast.train.cuda_graphs import clone_grads_on_accumulate, graph_detector

from ..conftest import require_backend
from .conftest import train_args


class StaticGradBuffer(torch.autograd.Function):
    """Stand-in for a graphed callable: y = x·w whose weight gradient is returned as a view of one static buffer,
    as ``make_graphed_callables``' backward does."""

    buffer = torch.zeros(3)

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        return (x * weight).detach()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        StaticGradBuffer.buffer.copy_(grad * x)
        return None, StaticGradBuffer.buffer.detach()


@pytest.mark.parametrize("clone", [False, True])
def test_accumulating_static_grad_buffers_needs_the_clone_hook(clone):
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.ones(3))
    if clone:
        clone_grads_on_accumulate(module)
    x1, x2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    for x in (x1, x2):
        StaticGradBuffer.apply(x, module.weight).sum().backward()
    expected = x1 + x2
    if clone:
        torch.testing.assert_close(module.weight.grad, expected)
    else:  # the failure the hook exists for: the first gradient was overwritten by the second replay
        torch.testing.assert_close(module.weight.grad, 2 * x2)


def test_graph_detector_refuses_bad_input():
    model = build_detector("49XS-custom", 3, image_size=128)
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device, got one on cpu"):
        graph_detector(model, 2)


def test_capture_plumbing_on_cpu(monkeypatch):
    """graph_detector's own work around the capture, with a stand-in for ``make_graphed_callables`` that runs
    its three warm-up steps: the sample arguments have the training shapes, autocast's cache is off, the BN
    statistics the warm-ups moved are put back, and a batch of another shape is refused."""
    calls = []

    def fake_make_graphed_callables(callables, sample_args):
        assert not torch.is_autocast_cache_enabled()
        calls.append([tuple(t.shape) for args in sample_args for t in torch.utils._pytree.tree_leaves(args)])
        for _ in range(3):
            images, (features,) = sample_args[0][0], sample_args[1]
            callables[0](images)
            sum(v.sum() for v in callables[1](features).values()).backward()
        return callables

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    monkeypatch.setattr("spinenet_fast.train.cuda_graphs.cuda_device_of", lambda model: torch.device("cpu"))
    model = build_detector("49XS-custom", 3, image_size=128)
    before = copy.deepcopy(model.state_dict())
    graph_detector(model, 2, amp_dtype=torch.bfloat16)
    assert calls == [[(2, 3, 128, 128), (2, 48, 16, 16), (2, 48, 8, 8), (2, 48, 4, 4), (2, 48, 2, 2), (2, 48, 1, 1)]]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"captured as a CUDA graph for images of shape \(2, 3, 128, 128\), got "
                                         r"\(1, 3, 128, 128\)"):  # fmt: skip
        model.backbone(torch.zeros(1, 3, 128, 128))
    model.eval()
    assert model.backbone(torch.zeros(1, 3, 128, 128))["p3"].shape == (1, 48, 16, 16)


def test_cuda_graph_cli_conflicts(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA --device, got 'cpu'"):
        train_main(train_args(tiny_data, tmp_path, "--cuda-graphs", "--device", "cpu"))
    with pytest.raises(ValueError, match="--cuda-graphs and --compile exclude each other"):
        train_main(train_args(tiny_data, tmp_path, "--cuda-graphs", "--device", "cuda", "--compile"))
    with pytest.raises(ValueError, match="drop --sync-bn"):
        train_main(train_args(tiny_data, tmp_path, "--cuda-graphs", "--device", "cuda", "--sync-bn"))


def _batch(seed: int, n: int = 2, size: int = 128):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).cuda() for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * (size - 40)
        wh = 8 + torch.rand(3, 2, generator=g) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).cuda(), "labels": torch.randint(1, 3, (3,)).cuda()})
    return images, targets


def _train(model, steps: int, accum_steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        for micro in range(accum_steps):
            losses = model(*_batch(10 * step + micro))
            (sum(losses.values()) / accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_graphed_training_equals_eager(backend):
    """Three optimiser steps of two accumulated batches, graphed vs eager (fp32, no stochastic depth): same
    weights and BN statistics; capture leaves the BN statistics alone; eval mode and bad shapes."""
    require_backend(backend)
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager = build_detector("49XS-custom", 3, image_size=128, stochastic_depth_rate=0.0,
                           fused=backend != "reference").cuda()  # fmt: skip
    graphed = copy.deepcopy(eager)
    with use_backend("auto" if backend == "reference" else backend):
        graph_detector(graphed, 2)
        for name, buffer in graphed.state_dict().items():
            torch.testing.assert_close(buffer, eager.state_dict()[name], rtol=0, atol=0, msg=name)
        _train(eager, 3, 2)
        _train(graphed, 3, 2)
        for name, value in eager.state_dict().items():
            torch.testing.assert_close(graphed.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
        graphed.eval()
        eager.eval()
        with torch.no_grad():
            images = _batch(99, n=1)[0]  # eval mode runs the ordinary forward: any batch size works
            torch.testing.assert_close(graphed(images)[0]["scores"], eager(images)[0]["scores"])
        graphed.train()
        with pytest.raises(ValueError, match=r"captured as a CUDA graph for images of shape \(2, 3, 128, 128\)"):
            graphed(*_batch(5, n=1))


@pytest.mark.gpu
def test_cuda_graphs_cli(tiny_data, tmp_path):
    train_main(
        train_args(
            tiny_data, tmp_path, "--epochs", "1", "--eval-every", "0", "--cuda-graphs", "--amp", "--device", "cuda"
        )
    )
    row = (tmp_path / "metrics.jsonl").read_text()
    assert '"images_per_s"' in row and '"max_memory_mb"' in row
