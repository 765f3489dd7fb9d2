"""Triton kernel of RetinaNet's loss: sigmoid focal loss of every (anchor, class) and Huber loss of every matched
anchor's box deltas, the box targets encoded on the fly from the matched ground truth and the anchor.

One kernel serves both passes: the forward writes per-program partial sums (programs, 3) of [focal, box, matched
anchors]; the backward (``BACKWARD``) recomputes from the logits and writes their gradient and the box deltas'.
cls_logits (N, A, K) and box_regression (N, A, 4) are addressed through their strides; matched (N, A), gt_labels
(N, G), gt_boxes (N, G, 4) and anchors (N, A, 4) are contiguous. Maths in fp32.
"""

import torch
import triton
import triton.language as tl

BLOCK_R = 16  # anchors per program
MAX_BLOCK_K = 128  # classes per step of the class loop
NUM_WARPS = 8


@triton.jit
def _log_sigmoids(z):
    """(log sigmoid(z), log sigmoid(−z)) without overflow, and log1p accurate where exp(−|z|) is tiny."""
    u = tl.exp(-tl.abs(z))
    log1p_u = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return -(tl.maximum(-z, 0.0) + log1p_u), -(tl.maximum(z, 0.0) + log1p_u)


@triton.jit
def _huber_coordinate(
    reg_ptr, d_reg_ptr, reg_offset, d_offset, target, fg, delta, g_box, rmask, BACKWARD: tl.constexpr
):
    """huber(reg − target, δ) / 4 of one box coordinate for matched rows (0 elsewhere); the backward stores its
    gradient ``clamp(reg − target, −δ, δ) / 4 · g_box`` (0 for rows not matched)."""
    d = tl.load(reg_ptr + reg_offset, mask=fg, other=0.0).to(tl.float32) - target
    if BACKWARD:
        grad = tl.where(fg, tl.minimum(tl.maximum(d, -delta), delta) * (0.25 * g_box), 0.0)
        tl.store(d_reg_ptr + d_offset, grad.to(d_reg_ptr.dtype.element_ty), mask=rmask)
    abs_d = tl.abs(d)
    loss = tl.where(abs_d < delta, 0.5 * d * d, delta * (abs_d - 0.5 * delta))
    return tl.where(fg, 0.25 * loss, 0.0)


@triton.jit
def _retinanet_loss_kernel(
    partial_ptr, d_logits_ptr, d_reg_ptr, grad_ptr,
    logits_ptr, reg_ptr, matched_ptr, labels_ptr, boxes_ptr, anchors_ptr,
    R, A, K, G, sl_n, sl_a, sl_k, sr_n, sr_a, sr_c,
    alpha, gamma, delta,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_R anchors (rows r = n·A + a of R = N·A) × all K classes, in steps of BLOCK_K."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    n, a = r // A, r % A
    m = tl.load(matched_ptr + r, mask=rmask, other=-2)  # ground-truth index, −1 background, −2 ignored
    fg = m >= 0
    valid = m >= -1
    gt = n * G + tl.maximum(m, 0)
    label = tl.load(labels_ptr + gt, mask=fg, other=-1)
    g_cls, g_box = 0.0, 0.0
    if BACKWARD:
        g_cls = tl.load(grad_ptr).to(tl.float32)
        g_box = tl.load(grad_ptr + 1).to(tl.float32)

    focal = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = (k < K)[None, :]
        mask = valid[:, None] & kmask
        offsets = n[:, None] * sl_n + a[:, None] * sl_a + k[None, :] * sl_k
        x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        positive = k[None, :] == label[:, None]
        z = tl.where(positive, x, -x)  # p_t = sigmoid(z)
        log_p, log_q = _log_sigmoids(z)  # log p_t, log(1 − p_t)
        alpha_t = tl.where(positive, alpha, 1.0 - alpha)
        modulator = tl.exp(gamma * log_q)  # (1 − p_t)^γ
        if BACKWARD:
            dz = alpha_t * modulator * (gamma * tl.exp(log_p) * log_p - tl.exp(log_q))
            dx = tl.where(mask, tl.where(positive, dz, -dz) * g_cls, 0.0)
            d_offsets = r[:, None] * K + k[None, :]
            tl.store(d_logits_ptr + d_offsets, dx.to(d_logits_ptr.dtype.element_ty), mask=rmask[:, None] & kmask)
        else:
            focal += tl.sum(tl.where(mask, -alpha_t * modulator * log_p, 0.0), axis=1)

    # Box targets: torchvision BoxCoder(weights=(1, 1, 1, 1)).encode of the matched box against the anchor.
    ax1 = tl.load(anchors_ptr + r * 4, mask=fg, other=0.0).to(tl.float32)
    ay1 = tl.load(anchors_ptr + r * 4 + 1, mask=fg, other=0.0).to(tl.float32)
    aw = tl.load(anchors_ptr + r * 4 + 2, mask=fg, other=1.0).to(tl.float32) - ax1
    ah = tl.load(anchors_ptr + r * 4 + 3, mask=fg, other=1.0).to(tl.float32) - ay1
    gx1 = tl.load(boxes_ptr + gt * 4, mask=fg, other=0.0).to(tl.float32)
    gy1 = tl.load(boxes_ptr + gt * 4 + 1, mask=fg, other=0.0).to(tl.float32)
    gw = tl.load(boxes_ptr + gt * 4 + 2, mask=fg, other=1.0).to(tl.float32) - gx1
    gh = tl.load(boxes_ptr + gt * 4 + 3, mask=fg, other=1.0).to(tl.float32) - gy1
    target_x = ((gx1 + 0.5 * gw) - (ax1 + 0.5 * aw)) / aw
    target_y = ((gy1 + 0.5 * gh) - (ay1 + 0.5 * ah)) / ah
    target_w, target_h = tl.log(gw / aw), tl.log(gh / ah)
    reg_row = n * sr_n + a * sr_a
    box = _huber_coordinate(reg_ptr, d_reg_ptr, reg_row, r * 4, target_x, fg, delta, g_box, rmask, BACKWARD)
    box += _huber_coordinate(reg_ptr, d_reg_ptr, reg_row + sr_c, r * 4 + 1, target_y, fg, delta, g_box, rmask,
                             BACKWARD)  # fmt: skip
    box += _huber_coordinate(reg_ptr, d_reg_ptr, reg_row + 2 * sr_c, r * 4 + 2, target_w, fg, delta, g_box, rmask,
                             BACKWARD)  # fmt: skip
    box += _huber_coordinate(reg_ptr, d_reg_ptr, reg_row + 3 * sr_c, r * 4 + 3, target_h, fg, delta, g_box, rmask,
                             BACKWARD)  # fmt: skip
    if not BACKWARD:
        pid = tl.program_id(0)
        tl.store(partial_ptr + pid * 3, tl.sum(focal, axis=0))
        tl.store(partial_ptr + pid * 3 + 1, tl.sum(box, axis=0))
        tl.store(partial_ptr + pid * 3 + 2, tl.sum(fg.to(tl.float32), axis=0))


def _launch(backward, grad, cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta):
    n, a, k = cls_logits.shape
    programs = triton.cdiv(n * a, BLOCK_R)
    partial = cls_logits.new_empty((programs, 3), dtype=torch.float32)
    d_logits = torch.empty((n, a, k), dtype=cls_logits.dtype, device=cls_logits.device) if backward else partial
    d_reg = torch.empty((n, a, 4), dtype=box_regression.dtype, device=cls_logits.device) if backward else partial
    if programs:
        _retinanet_loss_kernel[(programs,)](
            partial, d_logits, d_reg, grad if backward else partial,
            cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors,
            n * a, a, k, gt_labels.shape[1], *cls_logits.stride(), *box_regression.stride(),
            float(alpha), float(gamma), float(delta),
            BACKWARD=backward, BLOCK_R=BLOCK_R, BLOCK_K=min(MAX_BLOCK_K, triton.next_power_of_2(k)),
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return (d_logits, d_reg) if backward else partial.sum(0)


def retinanet_loss_forward(cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta):
    """sums (3,) fp32: [Σ focal over non-ignored anchors, Σ mean-of-4 Huber over matched anchors, matched count]."""
    return _launch(False, None, cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta)


def retinanet_loss_backward(grad, cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma,
                            delta):  # fmt: skip
    """(d_cls_logits (N, A, K), d_box_regression (N, A, 4)), contiguous in the inputs' dtypes, for the gradient
    ``grad`` (3,) of the forward's sums (its third entry, a count, has none)."""
    return _launch(True, grad, cls_logits, box_regression, matched, gt_labels, gt_boxes, anchors, alpha, gamma, delta)
