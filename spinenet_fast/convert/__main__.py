"""``python -m spinenet_fast.convert CKPT OUT.pt --model 49 [--task mask]``: an official TF2 Model Garden
RetinaNet-SpineNet (Mask R-CNN-SpineNet) checkpoint as a spinenet_fast checkpoint, ready for
``python -m spinenet_fast.eval --checkpoint OUT.pt``.

OUT.pt holds ``{"model": state_dict, "args": detector settings, "label_map": ...}`` (``--state-dict-only``: the
plain state_dict), loadable with ``torch.load(..., weights_only=True)``. Model Garden's COCO models predict 91
classes indexed by COCO category id; ``--annotations instances_val2017.json`` keeps that file's categories
(80 for COCO), so that our evaluation maps labels to the dataset's category ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.coco import LabelMap, read_instances
from ..detection.presets import TASK_DEFAULTS, TASKS
from ..detection.retinanet import DETECTOR_DEFAULTS
from ..models.spinenet import SCALING_MAP
from ..train.checkpoint import save_atomic
from .tf_checkpoint import TF_DETECTOR_KWARGS, from_tf_checkpoint, from_tf_maskrcnn_checkpoint


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="TF checkpoint prefix (ckpt-NNN) or a directory holding one")
    p.add_argument("output", type=Path, help="the .pt file to write")
    p.add_argument("--task", default="box", choices=list(TASKS), help="box: RetinaNet; mask: Mask R-CNN")
    p.add_argument("--model", required=True, type=str.upper, choices=list(SCALING_MAP),
                   help="the checkpoint's SpineNet id (any case)")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=91, help="the checkpoint's class count (COCO: 91)")
    p.add_argument("--annotations", type=Path, help="COCO instances JSON whose categories to keep")
    p.add_argument("--image-size", type=int, default=None, help="eval size; default: the model id's")
    p.add_argument("--activation", default=None, choices=("swish", "relu"),
                   help="the checkpoint's activation; default: the task's official one (swish, relu)")  # fmt: skip
    p.add_argument("--bn-eps", type=float, default=1e-3, help="the checkpoint's BN epsilon (Model Garden: 1e-3)")
    p.add_argument("--state-dict-only", action="store_true", help="write only the plain state_dict")
    args = p.parse_args(argv)

    if args.annotations is not None:
        label_map = LabelMap.from_categories(read_instances(args.annotations)["categories"])
        class_ids = list(label_map.category_ids)
        if max(class_ids) >= args.num_classes:
            raise ValueError(
                f"--annotations has category id {max(class_ids)}, but the checkpoint has {args.num_classes} classes "
                "(class index = category id)"
            )
    else:
        first = TASKS[args.task][2]  # Mask R-CNN's class 0 is the background, not a category
        label_map = LabelMap(tuple(range(first, args.num_classes)),
                             tuple(f"class {i}" for i in range(first, args.num_classes)))  # fmt: skip
        class_ids = None
    convert = from_tf_maskrcnn_checkpoint if args.task == "mask" else from_tf_checkpoint
    state_dict = convert(args.checkpoint, args.model, args.num_classes, class_ids=class_ids)
    if args.state_dict_only:
        save_atomic(state_dict, args.output)
    else:
        detector_args = {
            "task": args.task,
            "model": args.model,
            "image_size": args.image_size or DETECTOR_DEFAULTS[args.model][2],
            "activation": args.activation or TASK_DEFAULTS[args.task]["activation"],
            "bn_momentum": 0.01,
            "bn_eps": args.bn_eps,
            "stochastic_depth_rate": None,
            "fused": "auto",
            **TF_DETECTOR_KWARGS,
            "converted_from": str(args.checkpoint),
        }
        save_atomic({"model": state_dict, "args": detector_args, "label_map": label_map.to_dict()}, args.output)
    print(f"wrote {args.output}: {TASKS[args.task][1]}-SpineNet-{args.model}, {len(label_map)} classes")
    return args.output


if __name__ == "__main__":
    main()
