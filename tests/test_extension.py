"""The compiled extension is optional: importing the package never needs it, ops that do explain how to build it."""

import pytest

from spinenet_fast import _extension


def test_missing_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "extension", None)
    monkeypatch.setattr(_extension, "unavailable_reason", "spinenet_fast._C is not available (test)")
    with pytest.raises(RuntimeError, match=r"merge needs the compiled extension.*FORCE_CUDA=1"):
        _extension.require_extension("merge")
