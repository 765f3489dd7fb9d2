"""``--cuda-graphs``: the static-shape part of a training step (backbone and head, forward and backward) replayed
from CUDA graphs.

A RetinaNet step is static-shape only up to the head: anchor matching and the losses depend on how many boxes
each image has. So we capture the backbone's and the head's training forward and backward with
``torch.cuda.make_graphed_callables`` (one shared memory pool) and leave target matching, the losses, gradient
clipping and the optimiser eager. The modules keep their parameters and ``state_dict``; in eval mode they run
their ordinary forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def clone_grads_on_accumulate(module: nn.Module) -> None:
    """Make every parameter of ``module`` receive a fresh gradient tensor instead of a graph's static buffer.

    ``make_graphed_callables``' backward returns views of static buffers, and autograd adopts such a tensor as
    ``param.grad`` when the gradient was ``None``: the next replay then overwrites it, so accumulating two
    backward passes yields twice the second gradient (pytorch/pytorch#181723). Cloning in a tensor hook costs
    one copy of the gradients per backward.
    """
    for param in module.parameters():
        if param.requires_grad:
            param.register_hook(torch.Tensor.clone)


def graph_detector(model: nn.Module, batch_size: int, *, amp_dtype: torch.dtype | None = None) -> None:
    """Capture the training forward/backward of ``model.backbone`` and ``model.head`` for batches of
    ``batch_size`` images of the detector's square training size (``model.transform.min_size``), in place.

    ``model``: a torchvision-style RetinaNet on a CUDA device, in train mode, with every trainable parameter
    in the backbone or head. ``amp_dtype``: the autocast dtype the training step will use (``None``: fp32); it
    is baked into the graphs. Capturing runs three warm-up steps on zeros; the BN running statistics are put
    back afterwards. Later training batches must have exactly the captured shape (a clear ``ValueError``
    otherwise); DDP may wrap the model afterwards (its hooks stay outside the graphs).
    """
    device = cuda_device_of(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError("CUDA graphs do not capture nn.SyncBatchNorm's collectives: train without --sync-bn")
    size = model.transform.min_size[0]
    model.train()
    with torch.no_grad():
        images = model.transform([torch.zeros(3, size, size, device=device)] * batch_size)[0].tensors
    saved_buffers = [buffer.clone() for buffer in model.buffers()]
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                              cache_enabled=False)  # fmt: skip
    with autocast:
        with torch.no_grad():
            features = [f.detach().requires_grad_() for f in model.backbone(images).values()]
        torch.cuda.make_graphed_callables((model.backbone, model.head), ((images,), (features,)))
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), saved_buffers):
            buffer.copy_(saved)
    _check_shape_when_graphed(model.backbone, images)
    clone_grads_on_accumulate(model.backbone)
    clone_grads_on_accumulate(model.head)


def cuda_device_of(model: nn.Module) -> torch.device:
    """The CUDA device of ``model``'s parameters; ``ValueError`` when they are elsewhere."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a model on a CUDA device, got one on {device}")
    return device


def _check_shape_when_graphed(backbone: nn.Module, captured: Tensor) -> None:
    """Raise ``ValueError`` for a training batch of another shape: a graph would broadcast it into its buffer."""
    graphed_forward = backbone.forward

    def forward(x: Tensor):
        if backbone.training and x.shape != captured.shape:
            raise ValueError(
                f"the backbone's training step was captured as a CUDA graph for images of shape "
                f"{tuple(captured.shape)}, got {tuple(x.shape)}: keep the batch size and image size fixed "
                "(drop_last=True) or train without CUDA graphs"
            )
        return graphed_forward(x)

    backbone.forward = forward
