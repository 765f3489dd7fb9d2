"""The shell scripts the README and CI run parse (``bash -n``): a syntax error would show only on a fresh machine."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("benchmarks/*.sh"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_script_is_found():
    assert {"scripts/demo.sh", "scripts/install.sh", "scripts/test.sh", ".ci/run"} <= {
        str(p.relative_to(ROOT)) for p in SCRIPTS
    }
