"""SyncBN inside the fused ops: 2 gloo processes with DDP equal 1 process over the same global batch.

Eager ``nn.SyncBatchNorm`` needs a GPU inside a process group, so the CPU oracle is what SyncBN computes: BN
over the global batch in one process. The module is one cross-scale merge (a ↓4 and a ↑2 parent), the bottleneck
block it feeds (its first conv and projection shortcut one ``conv1x1_bn_pair``) and an endpoint on the block's output,
every BN of which runs in the fused path. DDP also refuses SyncBN modules on a CPU, so the workers average their
gradients with an all-reduce, as DDP does.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from spinenet_fast.models.blocks import BlockGroup
from spinenet_fast.models.endpoint import Endpoint
from spinenet_fast.models.layers import make_norm_factory
from spinenet_fast.models.resample import CrossScaleMerge, Resample
from spinenet_fast.ops import use_backend

from ..conftest import require_backend

STEPS = 2
# (global batch, the ↓4 parent's size, the ↑2 parent's, dtype): one image per rank on a 1×1 map leaves this rank one
# value per channel at the ↑2 parent's BNs, which nn.SyncBatchNorm accepts (more than one across its ranks); BN over
# two values amplifies rounding, so that case runs in float64
SIZES = {"batch 4": (4, 16, 2, torch.float32), "one 1×1 value per rank": (2, 8, 1, torch.float64)}


class MergeThenBlock(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        down = Resample(32, "bottleneck", 3, 16, 5, 0.5, norm, "swish", "torch")  # ↓4: conv3x3/s2 + one max-pool
        up = Resample(24, "residual", 6, 16, 5, 0.5, norm, "swish", "torch")  # ↑2
        self.merge = CrossScaleMerge([down, up], (0, 1), (), "swish", fused=True)
        self.group = BlockGroup("bottleneck", 16, 8, 1, norm, "swish", "torch", 0.0, fused=True)  # 16 -> 32: projected
        self.endpoint = Endpoint(32, 8, norm, "swish", fused=True)

    def forward(self, feats):
        return self.endpoint(self.group(self.merge(feats, readers=self.group.input_readers())))


def make_merge(norm_layer, dtype=torch.float32) -> MergeThenBlock:
    torch.manual_seed(0)
    module = MergeThenBlock(make_norm_factory(norm_layer, 0.1, 1e-3))
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    return module.to(dtype).train()


def global_batch(sizes=SIZES["batch 4"]):
    batch, down, up, dtype = sizes
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 32, down, down, generator=g, dtype=dtype),
            torch.randn(batch, 24, up, up, generator=g, dtype=dtype)]  # fmt: skip


def train(module, feats, sizes=SIZES["batch 4"], steps=STEPS, world_size=1):
    """SGD on the mean over this process's images of a fixed random projection of the output."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(sizes[0], 8, 2 * sizes[2], 2 * sizes[2], generator=g, dtype=sizes[3])
    for _ in range(steps):
        out = module(feats)
        first = dist.get_rank() * out.shape[0] if world_size > 1 else 0
        loss = (out * weight[first : first + out.shape[0]]).sum() / out.shape[0]
        optimizer.zero_grad()
        loss.backward()
        for p in module.parameters() if world_size > 1 else ():
            dist.all_reduce(p.grad)
            p.grad /= world_size
        optimizer.step()


def _worker(rank: int, init_file: str, backend: str | None, result: str, sizes: tuple) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        merge = make_merge(nn.SyncBatchNorm, sizes[3])
        half = sizes[0] // 2
        feats = [f[rank * half : (rank + 1) * half] for f in global_batch(sizes)]
        with use_backend(backend):
            train(merge, feats, sizes, world_size=2)
        if rank == 0:
            torch.save(merge.state_dict(), result)
    finally:
        dist.destroy_process_group()


# auto: Triton (under the interpreter) for every op that has Triton kernels, ATen for the max-pool.
@pytest.mark.parametrize(
    ("backend", "sizes"),
    [
        *[pytest.param(backend, SIZES["batch 4"], id=backend or "auto") for backend in ("reference", None, "cuda")],
        pytest.param("reference", SIZES["one 1×1 value per rank"], id="reference-one-value-per-rank"),
    ],
)
def test_two_process_sync_bn_equals_one_process_over_the_global_batch(tmp_path, backend, sizes):
    require_backend(backend)
    result = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, str(result), sizes), nprocs=2, join=True)
    distributed = torch.load(result, weights_only=True)

    single = make_merge(nn.BatchNorm2d, sizes[3])
    with use_backend(backend):
        train(single, global_batch(sizes), sizes)
    tolerance = 1e-5 if sizes[3] == torch.float32 else 1e-10
    expected = single.state_dict()
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(distributed[name], value, rtol=tolerance, atol=tolerance, msg=name)
    initial = make_merge(nn.BatchNorm2d, sizes[3]).state_dict()
    for name in ("merge.resamples.0.squeeze.conv.weight", "merge.resamples.1.expand.bn.running_var",
                 "group.0.shortcut.conv.weight", "group.0.conv1.bn.running_var", "endpoint.conv.weight",
                 "endpoint.bn.running_var"):  # fmt: skip
        assert not torch.equal(initial[name], expected[name]), name


def test_sync_bn_outside_a_process_group_is_bn():
    feats = global_batch()
    sync, plain = make_merge(nn.SyncBatchNorm), make_merge(nn.BatchNorm2d)
    with use_backend("reference"):
        torch.testing.assert_close(sync(feats), plain(feats))
    torch.testing.assert_close(sync.state_dict(), plain.state_dict())
