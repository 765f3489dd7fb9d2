"""The wgrads' split of the pixels (``kernels/gemm_backward.wgrad_split``): about two waves of the device's SMs —
the GPU's own count on CUDA, an H100's or H200's off a GPU (the interpreter, the ledger's model) — in whole
``block_k`` steps, never more chunks than steps, always one."""

from types import SimpleNamespace

import pytest
import torch
from spinenet_fast.kernels import gemm_backward
from spinenet_fast.kernels.gemm_backward import MODELLED_SMS, target_programs, wgrad_split


def test_off_a_gpu_the_split_models_an_h200():
    assert target_programs(torch.device("cpu")) == target_programs(torch.device("meta")) == 2 * MODELLED_SMS == 264
    # 264 // 4 = 66 chunks asked: 152 pixels each, rounded up to whole 32-pixel steps (160), so 63 chunks
    assert wgrad_split(10_000, 4, 32, torch.device("cpu")) == (63, 160)


@pytest.mark.parametrize(("sms", "chunks"), [(108, 54), (132, 66), (16, 8)])
def test_on_a_gpu_the_split_follows_its_multiprocessors(monkeypatch, sms, chunks):
    gemm_backward._multiprocessors.cache_clear()
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: asked.append(index) or SimpleNamespace(multi_processor_count=sms))  # fmt: skip
    try:
        assert target_programs(torch.device("cuda", 1)) == 2 * sms
        got, per_program = wgrad_split(100_000, 4, 64, torch.device("cuda", 1))
    finally:
        gemm_backward._multiprocessors.cache_clear()
    assert asked == [1]  # the device's own properties, asked once
    assert got == chunks and per_program % 64 == 0 and (got - 1) * per_program < 100_000 <= got * per_program


@pytest.mark.parametrize(("pixels", "tiles"), [(1, 1), (31, 2), (33, 2), (5000, 400), (64, 1000)])
def test_chunks_cover_the_pixels_in_whole_steps(pixels, tiles):
    chunks, per_program = wgrad_split(pixels, tiles, 32, torch.device("cpu"))
    assert 1 <= chunks <= -(-pixels // 32) and per_program % 32 == 0
    assert (chunks - 1) * per_program < pixels <= chunks * per_program
