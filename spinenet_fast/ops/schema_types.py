"""Types for ``torch.library.custom_op`` signatures: torch < 2.7 infers a schema from ``typing.List`` only (it
refuses ``list[Tensor]``), and it evaluates string annotations in its own namespace, so the modules that define
custom ops use these objects without ``from __future__ import annotations``. The README promises torch ≥ 2.6."""

from typing import List  # noqa: UP035

from torch import Tensor

TensorList = List[Tensor]  # noqa: UP006
IntList = List[int]  # noqa: UP006
FloatList = List[float]  # noqa: UP006
