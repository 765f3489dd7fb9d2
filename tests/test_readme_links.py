"""Every relative link in the README and the benchmarks' README points at a file or folder of the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_relative_links_resolve(readme):
    path = ROOT / readme
    targets = [t.split("#")[0] for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t)]
    assert targets, f"{readme}: no relative link found (the pattern is wrong)"
    missing = [t for t in targets if t and not (path.parent / t).exists()]
    assert not missing, missing
