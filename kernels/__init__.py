"""Triton kernels and their launchers, installed as ``spinenet_fast.kernels``.

Kernels here know nothing of autograd or dispatch: ``spinenet_fast.ops`` wraps them. Under Triton's CPU
interpreter (``TRITON_INTERPRET=1``) this package first installs the fixes of :mod:`.interpreter_compat`.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from .interpreter_compat import install

    install()
