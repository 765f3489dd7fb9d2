"""The demo's options reach the training run it starts (the run itself: tests/train/test_learning.py)."""

import spinenet_fast.demo as demo
from spinenet_fast.train.__main__ import get_args_parser


def test_demo_passes_model_fused_and_seed_to_training(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(demo, "make_synthetic_coco", lambda *a, **k: None)
    monkeypatch.setattr(demo, "train", lambda argv: calls.setdefault("train", argv))
    monkeypatch.setattr(demo, "evaluate_checkpoint", lambda argv: {"AP": 0.5, "AP50": 0.8})
    monkeypatch.setattr(demo, "save_validation_grid", lambda *a: None)
    demo.main(["--output-dir", str(tmp_path), "--seed", "3", "--fused", "true", "--model", "49XS-custom"])
    argv = calls["train"]
    args = get_args_parser().parse_args(argv)
    assert (args.seed, args.fused, args.model, args.epochs) == (3, "true", "49XS-custom", 10), argv
    assert argv.count("--seed") == 1, argv  # not also DEMO_TRAIN_ARGS' (argparse would take the last)
