"""The README's first command runs ``python -m spinenet_fast.smoke``; it must keep working."""

from spinenet_fast import smoke


def test_smoke_prints_shapes_and_parameter_count(capsys):
    smoke.main()
    out = capsys.readouterr().out
    assert "21,831,488 trainable parameters" in out
    assert "p7: (2, 256, 2, 2)" in out
