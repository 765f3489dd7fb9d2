"""Suite ``model``: SpineNet backbones, RetinaNet and Mask R-CNN detectors and classifiers, training steps and
inference, images/s.

Benches: ``backbone <id>``, ``retinanet <id>`` (our detector; its rows also carry torchvision's
``retinanet_resnet50_fpn`` at the same size and batch as provider ``torchvision-r50fpn``), ``maskrcnn <id>``
(:func:`~spinenet_fast.detection.maskrcnn_spinenet`, 91 classes; its rows carry torchvision's
``maskrcnn_resnet50_fpn`` as ``torchvision-r50fpn``) and ``classifier <id>``
(:class:`~spinenet_fast.models.SpineNetClassifier`, 1000 classes, at the classification size 256 px). Modes: ``train``
(forward with loss, backward, SGD step; the detectors' loss is torchvision's full training forward) and
``infer`` (eval mode, no grad, raw outputs without box decoding and NMS: RetinaNet's head outputs; Mask R-CNN's RPN
outputs, then its box head on 1000 and its mask head on 100 fixed RoIs per image, the official test-time counts,
so that the work does not depend on what random weights detect). Providers: ``eager``,
``compile``, ``compile-max`` (inference: ``max-autotune`` with freezing and CUDA graphs), ``fused-auto`` (the fused
model with each op's auto backend, as users run it). bf16 rows run under bf16 autocast with fp32 parameters, as
training with ``--amp`` does. Detection models at 640 px (--smoke: 128, fp32). Rows without ``torch.compile`` come
first, so that a time limit cuts the slowest rows; :func:`plan` lists the rows without running them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from spinenet_fast import SpineNet, SpineNetClassifier
from spinenet_fast.detection import maskrcnn_spinenet, retinanet_spinenet
from spinenet_fast.models.classifier import CLASSIFICATION_DEFAULTS
from spinenet_fast.ops import use_backend

from ._harness import Row, Settings, fused_backend, measure

PROVIDERS = ("eager", "compile", "compile-max", "fused-auto")
BENCHES = ("backbone", "retinanet", "maskrcnn", "classifier")
DETECTORS = ("retinanet", "maskrcnn")


def _loss(out) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.float().mean() if v.dim() else v.float() for v in out.values())
    return out.float().mean()


def _raw_outputs(detector: nn.Module) -> Callable[[torch.Tensor], dict]:
    """Backbone + head on an already normalised batch: the detector's raw class and box outputs, no NMS."""

    def raw(images: torch.Tensor) -> dict:
        return detector.head(list(detector.backbone(images).values()))

    return raw


def _raw_maskrcnn_outputs(detector: nn.Module, size: int) -> Callable[[torch.Tensor], dict]:
    """Mask R-CNN inference with fixed work: backbone, RPN head, box head + predictor on 1000 RoIs per image and mask
    head + predictor on 100 (random boxes, the same every call), no decoding or NMS."""
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(1000, 2, 2, generator=g) * (size - 16)
    rois = torch.cat([corners.min(1).values, corners.max(1).values + 16], 1)

    def raw(images: torch.Tensor) -> dict:
        features = detector.backbone(images)
        objectness, deltas = detector.rpn.head(list(features.values()))
        shapes = [(size, size)] * len(images)
        boxes = [rois.to(images.device)] * len(images)
        heads = detector.roi_heads
        scores, box_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, shapes)))
        masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [b[:100] for b in boxes], shapes)))
        return {"objectness": objectness[0], "deltas": deltas[0], "scores": scores, "boxes": box_deltas, "masks": masks}

    return raw


def _targets(batch: int, size: int, device: torch.device, dtype: torch.dtype, masks: bool = False) -> list[dict]:
    """4 random boxes per image with labels in [1, 91); ``masks``: each box's filled rectangle (uint8)."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        corners = torch.rand(4, 2, 2, generator=g) * size
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 8], 1).clamp(max=size)
        target = {"boxes": boxes.to(device, dtype), "labels": torch.randint(1, 91, (4,), generator=g).to(device)}
        if masks:
            filled = torch.zeros(4, size, size, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(filled, boxes.long().tolist()):
                mask[y1:y2, x1:x2] = 1
            target["masks"] = filled.to(device)
        targets.append(target)
    return targets


def _compiled(model_fn, provider: str, mode: str, smoke: bool):
    if smoke:
        return torch.compile(model_fn, backend="aot_eager")
    if provider == "compile-max":
        return torch.compile(model_fn, mode="max-autotune")
    return torch.compile(model_fn)


@contextlib.contextmanager
def _freezing(enabled: bool):
    import torch._inductor.config as inductor_config

    previous = inductor_config.freezing
    inductor_config.freezing = enabled
    try:
        yield
    finally:
        inductor_config.freezing = previous


def _step(model: nn.Module, forward: Callable, inputs: tuple, train: bool) -> Callable[[], object]:
    if not train:

        def infer():
            with torch.no_grad():
                return forward(*inputs)

        return infer
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step():
        loss = _loss(forward(*inputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def _build(bench: str, model_id, provider: str, size: int) -> nn.Module:
    fused = provider == "fused-auto"
    if bench == "backbone":
        return SpineNet(model_id, stochastic_depth_rate=0.0, fused=fused)
    if bench == "classifier":
        return SpineNetClassifier(model_id, 1000, stochastic_depth_rate=0.0, fused=fused)
    if provider == "torchvision-r50fpn":
        from torchvision.models import detection

        builder = getattr(detection, f"{bench}_resnet50_fpn")
        return builder(weights=None, weights_backbone=None, min_size=size, max_size=size)
    if bench == "maskrcnn":
        return maskrcnn_spinenet(model_id, image_size=size, fused=fused)
    return retinanet_spinenet(model_id, image_size=size, stochastic_depth_rate=0.0, fused=fused)


def plan(
    smoke: bool,
    *,
    models: tuple[str, ...] = ("49S", "49", "96"),
    train_batches: tuple[int, ...] = (8, 16),
    infer_batches: tuple[int, ...] = (1, 8),
    providers: tuple[str, ...] = PROVIDERS,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    compile_max_modes: tuple[str, ...] = ("train", "infer"),
    benches: tuple[str, ...] = BENCHES,
) -> list[tuple]:
    """``(bench, model_id, provider, mode, batch, dtype)`` of every row, rows with ``torch.compile`` last."""
    if smoke:
        # The compile providers' code path is the ops and connections suites' (compiling whole detectors with
        # aot_eager takes minutes on a CPU); fp32 because CPU bf16 convolutions are slow.
        models, train_batches, infer_batches = ("49XS-custom",), (2,), (1,)
        providers, dtypes = tuple(p for p in providers if not p.startswith("compile")), (torch.float32,)
    cases = []
    for dtype in dtypes:
        for bench in benches:
            for model_id in models:
                for mode, batch in [("train", b) for b in train_batches] + [("infer", b) for b in infer_batches]:
                    extra_providers = ("torchvision-r50fpn",) if bench in DETECTORS else ()
                    bench_providers = (*providers, *extra_providers)
                    if smoke and bench == "maskrcnn":  # its eager rows exercise its code; the others cost minutes
                        bench_providers = ("eager",)
                    for provider in bench_providers:
                        if provider != "compile-max" or mode in compile_max_modes:
                            cases.append((bench, model_id, provider, mode, batch, dtype))
    return sorted(cases, key=lambda case: case[2].startswith("compile"))  # stable: the order above otherwise


def run(s: Settings, env: dict, **selection) -> Iterator[Row]:
    """Rows for every case of :func:`plan` (``selection``: its keyword arguments)."""
    for bench, model_id, provider, mode, batch, dtype in plan(s.smoke, **selection):
        if s.smoke:
            from spinenet_fast.detection.presets import CUSTOM_SCALINGS

            model_spec = CUSTOM_SCALINGS[model_id]
        else:
            model_spec = model_id
        size = 128 if s.smoke else CLASSIFICATION_DEFAULTS["image_size"] if bench == "classifier" else 640
        yield _measure_case(s, env, bench, model_id, model_spec, provider, mode, batch, size, dtype)


def _measure_case(s, env, bench, model_id, model_spec, provider, mode, batch, size, dtype) -> Row:
    train = mode == "train"
    shape = f"b{batch} {size}px"
    name = f"{bench} {model_id}"
    try:
        model = _build(bench, model_spec, provider, size).to(s.device, memory_format=torch.channels_last)
        model.train(train)
        images = torch.randn(batch, 3, size, size, device=s.device).contiguous(memory_format=torch.channels_last)
        if bench in ("backbone", "classifier"):
            forward, inputs = model, (images,)
        elif train:
            targets = _targets(batch, size, s.device, torch.float32, masks=bench == "maskrcnn")
            forward, inputs = model, (list(images), targets)
        elif bench == "maskrcnn":
            forward, inputs = _raw_maskrcnn_outputs(model, size), (images,)
        else:
            forward, inputs = _raw_outputs(model), (images,)
        if provider.startswith("compile"):
            forward = _compiled(forward, provider, mode, s.smoke)
        step = _step(model, forward, inputs, train)
    except Exception as exc:  # a model that cannot be built or compiled is reported, not fatal
        return measure(s, env, _raiser(exc), bench=name, provider=provider, mode=mode, dtype=dtype, shape=shape)
    backend = fused_backend(s.device) if provider == "fused-auto" else None
    freezing = provider == "compile-max" and not train
    autocast = torch.autocast(s.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with use_backend(backend), _freezing(freezing), autocast:
        row = measure(s, env, step, bench=name, provider=provider, mode=mode, dtype=dtype, shape=shape)
    if row.p50_ms:
        row.extra["images_per_s"] = batch / (row.p50_ms * 1e-3)
    return row


def _raiser(exc: Exception) -> Callable[[], None]:
    def fail() -> None:
        raise exc

    return fail
