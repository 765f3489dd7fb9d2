"""``python -m benchmarks.compile_sm90 --out DIR``: every Triton kernel variant our launchers launch, compiled ahead
of time for Hopper (sm_90, ``GPUTarget("cuda", 90, 32)``) on any machine, GPU or not.

Variants are found, not listed. The drivers run the fused SpineNet and SpineNet-Mobile (every activation, padding
and float dtype; training forward + backward, the same with frozen norms, then inference) and every op over its
declared argument space (prologue or not, activations, paddings, dtypes, parents, extra input) on CPU tensors, with
``JITFunction.run`` replaced by a recorder: nothing runs, and Triton's own binder turns each launch's arguments into
the signature, constexprs and specialisation (16-byte divisibility, ints equal to 1) that the same launch on a GPU
would compile. Each distinct variant is compiled with ``triton.compile`` in a worker process; ptxas's own report
gives registers, spills and the stack frame, the metadata the shared memory, the PTX whether ``wgmma`` (Hopper's
tensor-core MMA) is used.

Writes ``DIR/compile_sm90.json`` and ``DIR/compile_sm90.md``. Exit status 1 on a compile error, a register
spill, or a ``@triton.jit`` kernel in ``spinenet_fast.kernels`` that no driver launched (a new kernel needs a
driver, not an entry in a list). Must run in a fresh process without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._triton_launches import intercepted_launches, kernel_modules, route_to_triton

TARGET_ARCH = 90
WARP_SIZE = 32
DRIVER_IMAGE_SIZE = 256  # every level 3..7 has ≥ 2×2 pixels, so no spatial size is the constant-1 specialisation
DRIVER_MODEL = "49S"


@dataclass
class Variant:
    """One compiled specialisation of one kernel, and what ptxas made of it."""

    kernel: str  # module:function
    constexprs: dict  # by parameter name (BLOCK_* included)
    pointer_dtypes: list[str]
    divisible_by_16: list[str]  # parameters specialised as multiples of 16 (pointers: 16-byte aligned)
    equal_to_1: list[str]  # int parameters specialised to the constant 1
    num_warps: int
    num_stages: int
    drivers: list[str] = field(default_factory=list)
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared_bytes: int | None = None
    wgmma: bool | None = None
    compile_s: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        """Pointer dtypes and the constexpr flags (tile sizes left out)."""
        dtypes = "/".join(dict.fromkeys(t.lstrip("*") for t in self.pointer_dtypes))
        flags = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if not k.startswith("BLOCK_"))
        return f"{dtypes} {flags}".strip()

    @property
    def specialisation(self) -> str:
        """How many parameters are specialised as multiples of 16, and which ints as the constant 1."""
        ones = f"; =1: {', '.join(self.equal_to_1)}" if self.equal_to_1 else ""
        return f"÷16: {len(self.divisible_by_16)}{ones}"


def jit_functions(modules: list[str]) -> dict[str, object]:
    """``module:name`` -> every ``@triton.jit`` function defined in ``modules``."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == name:
                found[f"{name}:{attr}"] = value
    return found


def device_helpers(functions: dict[str, object]) -> set[str]:
    """The jit functions that other jit functions call (device functions, never launched themselves)."""
    sources = {key: inspect.getsource(f.fn) for key, f in functions.items()}
    return {
        key
        for key, f in functions.items()
        if any(re.search(rf"\b{f.fn.__name__}\(", src) for other, src in sources.items() if other != key)
    }


class LaunchRecorder:
    """Replaces ``JITFunction.run``: each launch becomes a :class:`Variant` (deduplicated), nothing runs."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", TARGET_ARCH, WARP_SIZE))
        self.variants: dict[str, Variant] = {}
        self.compile_args: dict[str, tuple] = {}
        self.driver = ""

    def record(self, kernel, args, kwargs) -> None:
        from triton.runtime.jit import create_function_from_signature

        kwargs = {"debug": False, **kwargs}
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound_args, specialization, options
        )
        names = [p.name for p in kernel.params]
        named_constexprs = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        key = json.dumps(
            [kernel.fn.__module__, kernel.fn.__name__, signature, repr(sorted(constexprs.items())),
             repr(sorted(attrs.items())), options.num_warps, options.num_stages], default=str,
        )  # fmt: skip
        if key not in self.variants:
            kernel_params = {p.name for p in kernel.params if p.is_constexpr}
            self.variants[key] = Variant(
                kernel=f"{kernel.fn.__module__}:{kernel.fn.__name__}",
                constexprs={k: v for k, v in named_constexprs.items() if k in kernel_params},
                pointer_dtypes=[t for t in signature.values() if t.startswith("*")],
                divisible_by_16=[names[path[0]] for path, attr in attrs.items() if attr],
                equal_to_1=[k for k, v in named_constexprs.items() if k not in kernel_params and v == 1],
                num_warps=options.num_warps,
                num_stages=options.num_stages,
            )
            self.compile_args[key] = (kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs,
                                      options.__dict__)  # fmt: skip
        if self.driver not in self.variants[key].drivers:
            self.variants[key].drivers.append(self.driver)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def drive_model(dtype: torch.dtype, activation: str, padding: str, mobile: bool = False) -> None:
    """The fused backbone (SpineNet's, or with ``mobile`` SpineNet-Mobile's: its connections' ``expand_merge`` with
    a prologue on one parent only): a training step (forward + backward), one with frozen norms (``expand_merge_affine``
    forward and backward), then inference."""
    from spinenet_fast.models import SpineNet, SpineNetMobile

    from .ledger import training_mode

    build = SpineNetMobile if mobile else SpineNet
    model = build(DRIVER_MODEL, activation=activation, padding=padding, stochastic_depth_rate=0.0, fused=True)
    model = model.to(dtype=dtype, memory_format=torch.channels_last).train()
    x = _channels_last(torch.randn(2, 3, DRIVER_IMAGE_SIZE, DRIVER_IMAGE_SIZE, dtype=dtype))
    for frozen_norms in (False, True):
        outputs = training_mode(model, frozen_norms)(x)
        torch.autograd.backward([o for o in outputs.values()], [torch.ones_like(o) for o in outputs.values()])
    with torch.no_grad():
        model.eval()(x)


def drive_ops(dtype: torch.dtype, activation: str, padding: str) -> None:
    """Every public op over its argument space at one production-like shape (64 channels, 32×32, batch 2)."""
    from spinenet_fast.ops import (
        bn_finalize,
        conv1x1_bn,
        conv1x1_bn_pair,
        conv1x1_bn_stats,
        conv3x3_bn,
        conv3x3_bn_levels,
        conv3x3_bn_stats,
        conv3x3_levels,
        match_anchors,
        merge,
        pooled_conv1x1_bn,
        retinanet_loss,
    )
    from spinenet_fast.ops.merge import MAX_READERS, merge_for_readers

    def leaf(*shape, stats: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, dtype=torch.float32 if stats else dtype)
        return (_channels_last(t) if t.dim() == 4 else t).requires_grad_()

    def backward(*outputs: torch.Tensor) -> None:
        torch.autograd.backward(list(outputs), [torch.ones_like(o) for o in outputs])

    affine = (leaf(64, stats=True), leaf(64, stats=True))
    for scale, shift, act in ((None, None, "identity"), (*affine, activation)):
        backward(*conv1x1_bn_stats(leaf(2, 64, 32, 32), leaf(64, 64, 1, 1), scale, shift, act))
        # 32 input channels, one tile of them: the bf16/fp16 1×1 backward recomputes y (RECOMPUTE_Y)
        narrow = (None, None) if scale is None else (leaf(32, stats=True), leaf(32, stats=True))
        backward(*conv1x1_bn_stats(leaf(2, 32, 32, 32), leaf(64, 32, 1, 1), *narrow, act))
        backward(*conv1x1_bn(leaf(2, 32, 32, 32), leaf(64, 32, 1, 1), *narrow, act, bn_weight=leaf(64, stats=True),
                             bn_bias=leaf(64, stats=True), eps=1e-3))  # fmt: skip
        if dtype != torch.float32:  # the fp32 master weight of autocast
            backward(*conv1x1_bn_stats(leaf(2, 64, 32, 32), leaf(64, 64, 1, 1, stats=True), scale, shift, act))
        # without statistics (a BN with running statistics; the head's predictors): 1×1, 3×3 (with a bias), depthwise
        backward(conv1x1_bn_stats(leaf(2, 64, 32, 32), leaf(64, 64, 1, 1), scale, shift, act, statistics=False)[0])
        for weight in (leaf(64, 64, 3, 3), leaf(64, 1, 3, 3)):
            backward(conv3x3_bn_stats(leaf(2, 64, 32, 32), weight, scale, shift, act, padding, stride=1,
                                      bias=leaf(64, stats=True), statistics=False)[0])  # fmt: skip
        for stride in (1, 2):
            backward(*conv3x3_bn_stats(leaf(2, 64, 32, 32), leaf(64, 64, 3, 3), scale, shift, act, padding,
                                       stride=stride))  # fmt: skip
        # the head's predictors and towers: stride 1 with a bias (fp32 master under autocast)
        backward(*conv3x3_bn_stats(leaf(2, 64, 32, 32), leaf(64, 64, 3, 3), scale, shift, act, padding, stride=1,
                                   bias=leaf(64, stats=True)))  # fmt: skip
        bn = dict(bn_weight=leaf(64, stats=True), bn_bias=leaf(64, stats=True), eps=1e-3)  # with its BN's backward
        backward(*conv1x1_bn(leaf(2, 64, 32, 32), leaf(64, 64, 1, 1), scale, shift, act, **bn))
        if scale is None:  # a projected bottleneck's input convs (no prologue); 128 input channels: y read, not
            for c_in in (32, 128):  # recomputed
                backward(*conv1x1_bn_pair(leaf(2, c_in, 32, 32), leaf(64, c_in, 1, 1), leaf(96, c_in, 1, 1),
                                          bn_a=bn, bn_b=dict(bn, bn_weight=leaf(96, stats=True),
                                                             bn_bias=leaf(96, stats=True))))  # fmt: skip
        for stride in (1, 2):
            backward(*conv3x3_bn(leaf(2, 64, 32, 32), leaf(64, 64, 3, 3), scale, shift, act, padding, stride=stride,
                                 **bn))  # fmt: skip
        backward(*conv3x3_bn(leaf(2, 64, 32, 32), leaf(64, 64, 3, 3), scale, shift, act, padding, stride=1,
                             bias=leaf(64, stats=True), **bn))  # fmt: skip
        for stride in (1, 2):  # depthwise (SpineNet-Mobile's resampling), with and without its BN
            backward(*conv3x3_bn_stats(leaf(2, 64, 32, 32), leaf(64, 1, 3, 3), scale, shift, act, padding,
                                       stride=stride, bias=leaf(64, stats=True)))  # fmt: skip
            backward(*conv3x3_bn(leaf(2, 64, 32, 32), leaf(64, 1, 3, 3), scale, shift, act, padding, stride=stride,
                                 **bn))  # fmt: skip
        # the head's tower layers and predictors on five levels at once (packed P3…P7 of a 256 px image, fp32 master
        # weight and bias under autocast)
        sizes = [(32 >> k, 32 >> k) for k in range(5)]
        rows = sum(h * w for h, w in sizes)
        levels_affine = (None, None) if scale is None else (leaf(5, 64, stats=True), leaf(5, 64, stats=True))
        master = torch.float32 if dtype != torch.float32 else dtype
        level_bn = dict(bn_weights=[leaf(64, stats=True) for _ in sizes],
                        bn_biases=[leaf(64, stats=True) for _ in sizes], eps=1e-3,
                        running_means=[torch.zeros(64) for _ in sizes], running_vars=[torch.ones(64) for _ in sizes],
                        num_batches_tracked=[torch.zeros((), dtype=torch.long) for _ in sizes])  # fmt: skip
        conv_args = (leaf(2, rows, 64), sizes, leaf(64, 64, 3, 3).to(master), leaf(64, stats=True), *levels_affine)
        backward(*conv3x3_bn_levels(*conv_args, act, **level_bn))
        backward(conv3x3_levels(*conv_args, act))
        for num_pools in (1, 2) if scale is not None else ():  # the max-pools always follow a BN
            backward(*pooled_conv1x1_bn(leaf(2, 64, 32, 32), leaf(64, 64, 1, 1), scale, shift, act, num_pools, padding,
                                        **bn))  # fmt: skip
    for statistics_dtype in (torch.float32, torch.float64):  # the conv + BN ops' statistics are float64 (SyncBN's)
        statistics = torch.stack([torch.randn(64), torch.rand(64) + 64]).to(statistics_dtype).requires_grad_()
        running = [torch.zeros(64), torch.ones(64)]  # [Σ; Σ²] of 2048 values above
        backward(*bn_finalize(statistics, 2048, leaf(64, stats=True), leaf(64, stats=True), eps=1e-3,
                              running_mean=running[0], running_var=running[1],
                              num_batches_tracked=torch.zeros((), dtype=torch.long)))  # fmt: skip
    for ratios in ((1,), (2,), (1, 2)):
        for with_extra in (False, True):
            parents = [leaf(2, 64, 32 // r, 32 // r) for r in ratios]
            vectors = [leaf(64, stats=True) for _ in range(2 * len(ratios))]
            extra = leaf(2, 64, 32, 32) if with_extra else None
            backward(merge(parents, vectors[::2], vectors[1::2], list(ratios), extra, activation))
            for readers in range(2, MAX_READERS + 1):  # the backward summing every reader's gradient as it loads it
                backward(*merge_for_readers(parents, vectors[::2], vectors[1::2], list(ratios), extra, activation,
                                            readers=readers))  # fmt: skip
    # a block's tail under stochastic depth: the residual branch scaled per sample, an identity or projection shortcut
    factors = torch.tensor([1.25, 0.0])
    for ratios, with_extra in (((1,), True), ((1, 1), False)):
        parents = [leaf(2, 64, 32, 32) for _ in ratios]
        vectors = [leaf(64, stats=True) for _ in range(2 * len(ratios))]
        extra = leaf(2, 64, 32, 32) if with_extra else None
        for readers in range(1, MAX_READERS + 1):
            backward(*merge_for_readers(parents, vectors[::2], vectors[1::2], list(ratios), extra, activation,
                                        readers=readers, row_scale=factors))  # fmt: skip
    # RetinaNet's loss over 900 anchors × 91 COCO classes: 3 ground-truth boxes per image, every kind of match.
    corners = torch.rand(2, 903, 2) * 100
    boxes = torch.cat([corners, corners + 10], -1)
    matched, labels = torch.randint(-2, 3, (2, 900)), torch.randint(0, 91, (2, 3))
    sums = retinanet_loss(leaf(2, 900, 91), leaf(2, 900, 4), matched, labels, boxes[:, :3], boxes[:, 3:])
    backward(sums[:2])
    for low_quality in (True, False):
        match_anchors(boxes[:, 3:], boxes[:, :3], torch.ones(2, 3, dtype=torch.bool), 0.5, 0.4, low_quality)


def default_drivers() -> Iterator[tuple[str, Callable[[], None]]]:
    """``(name, driver)`` for the model and the ops, over every float dtype, activation and padding each takes."""
    from spinenet_fast.models.layers import ACTIVATIONS as MODEL_ACTIVATIONS
    from spinenet_fast.ops.activation import ACTIVATIONS as OP_ACTIVATIONS
    from spinenet_fast.ops.backends import FLOAT_DTYPES
    from spinenet_fast.ops.padding import PADDING_MODES

    for dtype in FLOAT_DTYPES:
        for padding in PADDING_MODES:
            for activation in OP_ACTIVATIONS:
                config = f"{str(dtype).removeprefix('torch.')} {activation} {padding}"
                if activation in MODEL_ACTIVATIONS:
                    yield f"model {config}", lambda d=dtype, a=activation, p=padding: drive_model(d, a, p)
                    yield f"mobile {config}", lambda d=dtype, a=activation, p=padding: drive_model(d, a, p, True)
                yield f"ops {config}", lambda d=dtype, a=activation, p=padding: drive_ops(d, a, p)


def record_variants(
    functions: dict[str, object], drivers: Iterable[tuple[str, Callable[[], None]]]
) -> tuple[LaunchRecorder, list[str]]:
    """Run every driver under the recorder; returns it and the kernels of ``functions`` no driver launched."""
    route_to_triton()
    recorder = LaunchRecorder()
    with intercepted_launches(recorder.record):
        for name, drive in drivers:
            recorder.driver = name
            drive()
    launched = {v.kernel for v in recorder.variants.values()}
    unlaunched = sorted(set(functions) - device_helpers(functions) - launched)
    return recorder, unlaunched


PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_frame": r"(\d+) bytes stack frame",
}


def compile_variant(module: str, name: str, signature, constexprs, attrs, options: dict) -> dict:
    """Compile one variant for sm_90 in this (worker) process; ptxas's report, shared memory, wgmma use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
                options=options,
            )
    except Exception as exc:  # reported per variant; the run goes on
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    report = {k: int(m.group(1)) if (m := re.search(p, log.getvalue())) else None for k, p in PTXAS_PATTERNS.items()}
    return {
        **report,
        "shared_bytes": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
        "compile_s": round(time.perf_counter() - started, 2),
    }


def largest_per_kernel_and_dtypes(variants: dict[str, Variant]) -> list[str]:
    """The keys of one variant per kernel and set of pointer dtypes (bf16 activations with fp32 weights, say,
    whichever pointers take which): the one with the largest tiles, then the most pipeline stages and warps — where
    register pressure, hence a spill, shows first."""
    chosen: dict[tuple, tuple] = {}
    for key, v in variants.items():
        tiles = math.prod(value for name, value in v.constexprs.items() if name.startswith("BLOCK_"))
        rank = (tiles, v.num_stages, v.num_warps, len(v.label), v.label)
        group = (v.kernel, tuple(sorted(set(v.pointer_dtypes))))
        if group not in chosen or rank > chosen[group][0]:
            chosen[group] = (rank, key)
    return [key for _, key in chosen.values()]


def compile_all(recorder: LaunchRecorder, jobs: int, sample: bool = False) -> list[Variant]:
    """Compile every recorded variant (``jobs`` worker processes, a fresh Triton cache: ptxas always runs); with
    ``sample``, only :func:`largest_per_kernel_and_dtypes` (CI's quick check)."""
    keys = largest_per_kernel_and_dtypes(recorder.variants) if sample else list(recorder.variants)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(compile_variant, *recorder.compile_args[key]) for key in keys]
            for key, future in zip(keys, futures):
                for attr, value in future.result().items():
                    setattr(recorder.variants[key], attr, value)
    return [recorder.variants[key] for key in keys]


def failures(variants: list[Variant], unlaunched: list[str]) -> list[str]:
    """Why the check fails: compile errors, spills, kernels no driver launched."""
    problems = [f"{k}: no driver launches this @triton.jit kernel" for k in unlaunched]
    for v in variants:
        if v.error:
            problems.append(f"{v.kernel} [{v.label}]: compile error: {v.error.splitlines()[0]}")
        elif v.registers is None:
            problems.append(f"{v.kernel} [{v.label}]: no ptxas report was captured")
        elif v.spill_stores or v.spill_loads:
            problems.append(
                f"{v.kernel} [{v.label}]: {v.spill_stores} bytes spill stores, {v.spill_loads} bytes spill loads "
                f"({v.registers} registers)"
            )
    return problems


def environment() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "target": f"cuda sm_{TARGET_ARCH}",
            "python": sys.version.split()[0]}  # fmt: skip


def to_markdown(variants: list[Variant], env: dict, problems: list[str]) -> str:
    tables = ", ".join(f"`{table}`" for table in env.get("since") or [])
    since = [f"Only the variants none of {tables} holds: {len(variants)} of {env['recorded']}.", ""]
    since = since if env.get("since") else []
    lines = [
        f"# Triton kernels compiled for sm_{TARGET_ARCH} (ahead of time, no GPU)",
        "",
        f"triton {env['triton']}, torch {env['torch']}; {len(variants)} variants found by running the fused model "
        "and the ops' argument spaces under a launch recorder. Registers and spills from ptxas; shared memory "
        "from Triton's metadata; wgmma: the PTX uses Hopper's warp-group MMA.",
        "",
        *since,
        "| kernel | variant | specialisation | warps | registers | spill st/ld (B) | stack (B) | shared (KiB) | wgmma "
        "| compile (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for v in sorted(variants, key=lambda v: (v.kernel, v.label, v.specialisation)):
        head = f"| {v.kernel.split(':')[1]} | {v.label} | {v.specialisation} | {v.num_warps}"
        if v.error:
            lines.append(f"{head} | error: {v.error.splitlines()[0][:80]} | | | | | |")
            continue
        lines.append(
            f"{head} | {v.registers} | {v.spill_stores}/"
            f"{v.spill_loads} | {v.stack_frame} | {v.shared_bytes / 1024:.1f} | {'yes' if v.wgmma else 'no'} | "
            f"{v.compile_s} |"
        )
    lines += ["", "## Problems", "", *(f"- {p}" for p in problems)] if problems else ["", "No problems."]
    return "\n".join(lines) + "\n"


def variant_key(variant: dict) -> tuple:
    """What makes a variant (``asdict`` of a :class:`Variant`) a distinct compilation: kernel, constexprs, pointer
    dtypes, specialisations, warps and stages."""
    return (variant["kernel"], json.dumps(variant["constexprs"], sort_keys=True), tuple(variant["pointer_dtypes"]),
            tuple(sorted(variant["divisible_by_16"])), tuple(sorted(variant["equal_to_1"])), variant["num_warps"],
            variant["num_stages"])  # fmt: skip


def drop_compiled(recorder: LaunchRecorder, table: Path) -> None:
    """Leave in ``recorder`` only the variants that ``table`` (an earlier ``compile_sm90.json``) does not hold."""
    compiled = {variant_key(v) for v in json.loads(table.read_text())["variants"]}
    recorder.variants = {k: v for k, v in recorder.variants.items() if variant_key(asdict(v)) not in compiled}


def check_kernels(
    modules: list[str], drivers: Iterable[tuple[str, Callable[[], None]]], out: Path, jobs: int, sample: bool = False,
    since: Sequence[Path] = (),
) -> list[str]:  # fmt: skip
    """Record, compile and report every kernel variant of ``modules`` that ``drivers`` launch (with ``sample``: the
    largest per kernel and dtypes; with ``since``: those no earlier table of them holds): writes
    ``out/compile_sm90.{json,md}`` and returns the problems (empty: every compiled variant compiles without
    spills)."""
    started = time.perf_counter()
    functions = jit_functions(modules)  # imported as real JITFunctions: the interpreter flag is not set yet
    recorder, unlaunched = record_variants(functions, drivers)
    recorded, recorded_s = len(recorder.variants), time.perf_counter() - started
    for table in since:
        drop_compiled(recorder, table)
    variants = compile_all(recorder, jobs, sample)
    problems = failures(variants, unlaunched)
    env = {**environment(), "record_s": round(recorded_s, 1), "total_s": round(time.perf_counter() - started, 1),
           "recorded": recorded, "since": [str(table) for table in since]}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "unlaunched": unlaunched, "problems": problems, "variants": [asdict(v) for v in variants]}
    (out / "compile_sm90.json").write_text(json.dumps(payload, indent=1))
    (out / "compile_sm90.md").write_text(to_markdown(variants, env, problems))
    print(f"{len(variants)} variants compiled for sm_{TARGET_ARCH} in {env['total_s']} s "
          f"(recording {env['record_s']} s); {len(problems)} problems", flush=True)  # fmt: skip
    for problem in problems:
        print(f"  {problem}", flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_sm90", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    sample_help = "one variant per kernel and dtypes, the largest tiles (CI's check); default: all"
    parser.add_argument("--sample", action="store_true", help=sample_help)
    since_help = "earlier runs' compile_sm90.json: compile only the variants none of them holds (after a change)"
    parser.add_argument("--since", type=Path, nargs="+", default=[], help=since_help)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be real JITFunctions to compile")
    import triton

    if not hasattr(triton, "knobs"):
        parser.error(f"needs Triton >= 3.4 (its knobs print ptxas's report); this is Triton {triton.__version__}")
    problems = check_kernels(kernel_modules(), default_drivers(), args.out, args.jobs, args.sample, args.since)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
