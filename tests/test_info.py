"""``python -m spinenet_fast.info`` names every op and explains every unavailable backend."""

from spinenet_fast.info import report


def test_report_lists_ops_backends_and_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text = report()
    for op in ("conv1x1_bn_stats", "conv3x3s2_bn_stats", "bn_act_maxpool", "merge", "bn_finalize"):
        assert op in text
    assert "reference: yes" in text
    assert "triton: tensors are on the CPU and TRITON_INTERPRET is not 1" in text
    assert "merge                runs on reference |" in text  # auto never picks the extension's CPU twins
    assert "bn_act_maxpool       runs on reference |" in text
    assert "triton: no triton implementation of bn_act_maxpool" in text
    assert "compiled extension spinenet_fast._C" in text
