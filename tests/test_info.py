"""``python -m spinenet_fast.info`` names every op and explains every unavailable backend."""

from spinenet_fast.info import report


def test_report_lists_ops_backends_and_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text = report()
    for op in ("conv1x1_bn_stats", "conv3x3_bn_stats", "bn_act_maxpool", "merge", "bn_finalize"):
        assert op in text
    assert "reference: yes" in text
    assert "triton: tensors are on the CPU and TRITON_INTERPRET is not 1" in text
    assert "merge                runs on reference |" in text  # auto never picks the extension's CPU twins
    assert "bn_act_maxpool       runs on reference |" in text
    assert "triton: no triton implementation of bn_act_maxpool" in text
    assert "compiled extension spinenet_fast._C" in text


def test_report_lists_optional_integrations(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real_find_spec(name))
    text = report()
    assert 'timm         not installed — pip install "spinenet-fast[timm]" for timm.create_model(' in text
    for module in ("tensorflow", "onnx", "onnxscript", "onnxruntime"):
        assert f"  {module:12s} " in text
        status = text.split(f"  {module:12s} ")[1].splitlines()[0]
        assert status.startswith(("available (", "not installed — pip install")), status


def test_missing_optional_dependency_says_which_extra(monkeypatch):
    import sys

    import pytest

    from spinenet_fast._optional import require
    from spinenet_fast.integrations.timm import register

    monkeypatch.setitem(sys.modules, "timm", None)  # makes ``import timm`` fail
    with pytest.raises(ImportError, match=r"needs the optional dependency 'timm' .*\"spinenet-fast\[timm\]\""):
        register()
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r'converting official TF checkpoints .*"spinenet-fast\[tf\]"'):
        require("tensorflow")
