"""``register()``: SpineNet backbones in timm's registry (``[timm]`` extra).

After ``spinenet_fast.integrations.timm.register()``, ``timm.create_model("spinenet49", features_only=True)``
returns :class:`SpineNetFeatures` around our :class:`~spinenet_fast.models.SpineNet`: ``forward(x)`` gives the list
P3…P7 (NCHW; ``out_indices`` picks among them, and the endpoints and blocks no picked one reads are dropped) and
``feature_info.channels()`` / ``.reduction()`` describe them.
Without ``features_only`` it is the SpineNet itself (``forward`` -> ``OrderedDict`` p3…p7). Names:
``spinenet49s``, ``spinenet49``, ``spinenet96``, ``spinenet143``, ``spinenet143l``, ``spinenet190``; keyword
arguments go to ``SpineNet`` (timm's ``drop_path_rate`` is its ``stochastic_depth_rate``). No pretrained timm
weights exist: ``pretrained=True`` raises, see ``spinenet_fast.convert`` for the official TF weights.
``spinenet49_cls`` … ``spinenet190_cls`` are :class:`~spinenet_fast.models.SpineNetClassifier` (timm's ``num_classes``,
``drop_rate``, ``drop_path_rate`` apply), for timm's training and validation scripts.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._optional import require
from ..detection.retinanet import DETECTOR_DEFAULTS, IMAGENET_MEAN, IMAGENET_STD
from ..models.classifier import CLASSIFICATION_DEFAULTS, SpineNetClassifier
from ..models.spinenet import SCALING_MAP, SpineNet

# timm fills these from its pretrained config; a backbone has no classifier and a fixed 3-channel input.
CLASSIFIER_KWARGS = ("num_classes", "global_pool", "in_chans")


class SpineNetFeatures(nn.Module):
    """timm's ``features_only`` form of a SpineNet: x (N, 3, H, W) -> [endpoint (N, C, H / 2^l, W / 2^l) for each
    ``out_indices`` entry, indices into P3…P7], with a timm ``FeatureInfo``. The SpineNet is ``self.body``."""

    def __init__(self, model: SpineNet, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        from timm.models import FeatureInfo

        names = list(model.endpoints)
        valid = isinstance(out_indices, (tuple, list)) and len(out_indices) > 0
        if not (valid and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(names)
                              for i in out_indices)):  # fmt: skip
            raise ValueError(f"out_indices must be a non-empty tuple of indices into P3…P7 (0…{len(names) - 1}), "
                             f"got {out_indices!r}")  # fmt: skip
        self.feature_info = FeatureInfo(list(model.feature_info), tuple(out_indices))
        self.names = [names[i] for i in self.feature_info.out_indices]
        model.keep_endpoints(self.names)  # no parameter without a gradient
        self.body = model

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)
        return [features[name] for name in self.names]


def _build(model_id: str, **kwargs) -> SpineNet:
    if "drop_path_rate" in kwargs:
        kwargs["stochastic_depth_rate"] = kwargs.pop("drop_path_rate")
    return SpineNet(model_id, **kwargs)


def _build_classifier(model_id: str, **kwargs) -> SpineNetClassifier:
    """timm's classifier keywords in :class:`SpineNetClassifier`'s terms (``drop_rate``: the dropout before the dense
    layer, ``drop_path_rate``: stochastic depth; ``global_pool`` must be ``"avg"``, the official head's)."""
    renames = {"drop_rate": "dropout_rate", "drop_path_rate": "stochastic_depth_rate"}
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    kwargs.pop("in_chans", None)  # timm's builder passes it on; ``create`` checked it
    pool = kwargs.pop("global_pool", "avg")
    if pool != "avg":
        raise ValueError(f"global_pool must be 'avg' (the official head's pooling), got {pool!r}")
    return SpineNetClassifier(model_id, **kwargs)


def _entrypoint(model_id: str, name: str, classifier: bool):
    from timm.models import build_model_with_cfg

    def create(pretrained: bool = False, **kwargs):
        in_chans = kwargs.pop("in_chans", 3)
        if in_chans != 3:
            raise ValueError(f"{name} takes RGB images: in_chans must be 3, got {in_chans!r}")
        if pretrained:
            raise ValueError(
                f"{name} has no pretrained timm weights; convert the official TF checkpoints with "
                "spinenet_fast.convert.from_tf_checkpoint and load them into the backbone"
            )
        if kwargs.get("pretrained_cfg") is None:  # timm passes None: describe the input, no weights
            size = CLASSIFICATION_DEFAULTS["image_size"] if classifier else DETECTOR_DEFAULTS[model_id][2]
            kwargs["pretrained_cfg"] = {"input_size": (3, size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                        "num_classes": 1000 if classifier else 0, "architecture": name}  # fmt: skip
            if classifier:  # the dense layer, and a full-image crop (sizes are multiples of 128)
                kwargs["pretrained_cfg"] |= {"classifier": "fc", "crop_pct": 1.0}
        if classifier:
            return build_model_with_cfg(_build_classifier, name, pretrained=False, model_id=model_id, **kwargs)
        return build_model_with_cfg(
            _build,
            name,
            pretrained=False,
            model_id=model_id,
            feature_cfg={"feature_cls": SpineNetFeatures},  # timm's wrappers expect a chain of stages
            kwargs_filter=CLASSIFIER_KWARGS,
            **kwargs,
        )

    create.__name__ = create.__qualname__ = name
    system = "classifier (the official classification head): logits" if classifier else "backbone: P3–P7 feature maps"
    create.__doc__ = f"SpineNet-{model_id} {system} (spinenet_fast)."
    return create


def register() -> list[str]:
    """Register every official SpineNet id with timm, as a backbone (``spinenet49``) and as a classifier
    (``spinenet49_cls``) (idempotent); returns the registered names."""
    timm = require("timm")
    from timm.models import register_model

    names = []
    for model_id in SCALING_MAP:
        for classifier in (False, True):
            name = f"spinenet{model_id.lower()}" + ("_cls" if classifier else "")
            if not timm.is_model(name):
                register_model(_entrypoint(model_id, name, classifier))
            names.append(name)
    return names
