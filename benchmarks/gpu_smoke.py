"""``python -m benchmarks.gpu_smoke --out DIR``: does every op backend and the fused model compute the right thing on
this machine's device, in fp32, bf16 and fp16? A one-minute check that a GPU run makes before any timing.

Ops: the ops suite's cases (SpineNet-49's L5 → L3 / L3 → L5 shapes at 640 px, batch 8), each backend forced,
forward outputs and the gradients of every input. Model: SpineNet-49S at 256 px, batch 2, training mode,
``fused=True`` with each op's auto backend against the eager model with the same weights (bf16 and fp16 under
autocast, as ``--amp`` trains): the outputs' max |error| against float64 eager, with finite parameter gradients.
Op errors are relative to float64 eager maths, ‖a − ref‖ / ‖ref‖ over all outputs and over all input gradients
(the larger reported). A row passes by fused_ops.md §5's rule: err(fused) ≤ 2·err(eager in the same dtype) + tol,
tol = 1e-5 for fp32 and 1e-2 for bf16/fp16 (eager fp32 on a GPU may use TF32 convolutions, which the rule's eager
term absorbs); a non-finite error fails.

Writes ``DIR/smoke.json`` and ``DIR/smoke.md`` (the model's rows first, then the ops', rewritten after each row);
exit status 1 when a row fails or errors. ``--tiny`` (the ops suite's smoke shapes, a 49XS-custom model at 128 px)
lets a CPU run the script under the Triton interpreter.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from spinenet_fast.ops import use_backend

from . import ops as op_suite
from ._harness import Settings

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def relative_error(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> float:
    """‖got − want‖ / ‖want‖ over all the tensors together (NaN or infinity anywhere: infinity)."""
    pairs = [(a.double().flatten(), b.double().flatten()) for a, b in zip(got, want, strict=True) if b is not None]
    if any(a is None for a, _ in pairs):
        return float("inf")
    diff = torch.linalg.vector_norm(torch.cat([a - b for a, b in pairs])).item()
    norm = torch.linalg.vector_norm(torch.cat([b for _, b in pairs])).item()
    return diff / max(norm, 1e-30) if diff == diff else float("inf")


def _outputs_and_grads(fn: Callable, inputs: tuple, weights: list[torch.Tensor] | None):
    """Forward outputs and the gradients of ``inputs`` for the loss Σ_i ⟨out_i, weights_i⟩."""
    outputs = _tensors(fn(*inputs))
    weights = weights or [torch.randn_like(o, dtype=torch.float64) / o.numel() ** 0.5 for o in outputs]
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    leaves = [t for t in inputs if t.requires_grad]
    return [o.detach() for o in outputs], list(torch.autograd.grad(loss, leaves, allow_unused=True)), weights


def _as(inputs: tuple, dtype: torch.dtype | None) -> tuple:
    """Fresh leaves (activations cast to ``dtype``; fp32 vectors stay fp32 unless ``dtype`` is float64; integer
    tensors as they are)."""
    cast = []
    for t in inputs:
        target = dtype if t.is_floating_point() and (dtype == torch.float64 or t.dim() == 4) else t.dtype
        cast.append(t.detach().to(target).requires_grad_(t.requires_grad))
    return tuple(cast)


def op_rows(device: torch.device, tiny: bool, rows: list[dict]) -> None:
    settings = Settings(device, warmup=0, runs=1, smoke=tiny)
    for dtype in DTYPES:
        for case in op_suite.cases(settings, dtype):
            inputs = case.make_input()
            ref_out, ref_grads, weights = _outputs_and_grads(case.eager, _as(inputs, torch.float64), None)
            eager_out, eager_grads, _ = _outputs_and_grads(case.eager, _as(inputs, None), weights)
            eager_error = max(relative_error(eager_out, ref_out), relative_error(eager_grads, ref_grads))
            for backend in case.backends():
                fused_error = functools.partial(_fused_error, case.fused, inputs, backend, ref_out, ref_grads, weights)
                rows.append(_judge(f"op {case.name}", backend, dtype, eager_error, fused_error))


def _fused_error(fused, inputs, backend, ref_out, ref_grads, weights) -> float:
    with use_backend(backend):
        out, grads, _ = _outputs_and_grads(fused, _as(inputs, None), weights)
    return max(relative_error(out, ref_out), relative_error(grads, ref_grads))


def _judge(check: str, backend: str, dtype: torch.dtype, eager_error: float, fused_error: Callable[[], float]) -> dict:
    row = {"check": check, "backend": backend, "dtype": str(dtype).removeprefix("torch."), "eager_error": eager_error}
    try:
        row["fused_error"] = fused_error()
        row["ok"] = math.isfinite(row["fused_error"]) and row["fused_error"] <= 2 * eager_error + TOLERANCE[dtype]
    except Exception as exc:  # reported as a failed row; the other rows still run
        traceback.print_exc()
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    print(json.dumps(row), flush=True)
    return row


def _model_outputs(model, images, dtype: torch.dtype, backward: bool) -> tuple[list[torch.Tensor], bool]:
    """Training-mode outputs (p3…p7; bf16/fp16 under autocast) and, with ``backward``, whether every parameter
    gradient of Σ mean(p²) is finite."""
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(images.device.type, dtype=dtype, enabled=dtype not in (torch.float32, torch.float64))
    with autocast, torch.set_grad_enabled(backward):
        outputs = list(model.train()(images).values())
    finite = True
    if backward:
        sum((o.float() ** 2).mean() for o in outputs).backward()
        finite = all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())
    return [o.detach().double() for o in outputs], finite


def _max_abs_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    error = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
    return error if error == error else float("inf")


def model_rows(device: torch.device, tiny: bool, rows: list[dict]) -> None:
    """Whole-model outputs judged as tests/models/test_fused_spinenet.py judges them: per-level max |error| against
    float64 eager (training-mode BN of random weights makes gradients chaotic in any precision: max-pool and BN
    decisions flip, so gradients are only required to be finite here; the op rows check them against float64)."""
    from torch import nn

    from spinenet_fast.detection.presets import CUSTOM_SCALINGS
    from spinenet_fast.models import SpineNet

    spec, size = (CUSTOM_SCALINGS["49XS-custom"], 128) if tiny else ("49S", 256)
    torch.manual_seed(0)
    eager, fused, exact = (SpineNet(spec, stochastic_depth_rate=0.0, fused=f) for f in (False, True, False))
    for bn in eager.modules():
        if isinstance(bn, nn.BatchNorm2d):  # non-trivial affine maps, as the tests use
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    state = eager.state_dict()
    for model in (fused, exact):
        model.load_state_dict(state)
    eager, fused = (m.to(device, memory_format=torch.channels_last) for m in (eager, fused))
    images = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    reference, _ = _model_outputs(exact.to(device, torch.float64), images.double(), torch.float64, backward=False)
    for dtype in DTYPES:
        eager.load_state_dict(state)
        eager_out, _ = _model_outputs(eager, images, dtype, backward=False)
        eager_error = _max_abs_error(eager_out, reference)
        fused_error = functools.partial(_fused_model_error, fused, state, images, dtype, reference)
        name = f"model SpineNet-{'49XS-custom' if tiny else '49S'} fused=True, {size} px b2, train fwd (+bwd finite)"
        rows.append(_judge(name, "auto", dtype, eager_error, fused_error))


def _fused_model_error(fused, state, images, dtype, reference) -> float:
    fused.load_state_dict(state)
    out, finite = _model_outputs(fused, images, dtype, backward=True)
    return _max_abs_error(out, reference) if finite else float("inf")


class WrittenRows(list):
    """The rows so far, rewritten to ``smoke.json`` and ``smoke.md`` after each one: a stopped run keeps them."""

    def __init__(self, out: Path, device: str) -> None:
        super().__init__()
        self.out, self.device = out, device

    def append(self, row: dict) -> None:
        super().append(row)
        (self.out / "smoke.json").write_text(json.dumps({"device": self.device, "rows": list(self)}, indent=1))
        (self.out / "smoke.md").write_text(to_markdown(list(self), self.device))


def to_markdown(rows: list[dict], device: str) -> str:
    lines = [f"# GPU correctness smoke ({device})", "",
             "Relative errors against float64 eager maths; ok: err(fused) ≤ 2·err(eager) + tol.", "",
             "| check | backend | dtype | fused error | eager error | ok |",
             "|---|---|---|---:|---:|:---:|"]  # fmt: skip
    for r in rows:
        fused = r.get("error") or f"{r['fused_error']:.2e}"
        lines.append(f"| {r['check']} | {r['backend']} | {r['dtype']} | {fused} | {r['eager_error']:.2e} | "
                     f"{'yes' if r['ok'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script on a CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = WrittenRows(args.out, name)
    model_rows(device, args.tiny, rows)  # first: a run stopped by its time cap keeps the whole model's verdict
    op_rows(device, args.tiny, rows)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} smoke rows passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
