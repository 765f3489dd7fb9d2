"""Rendering of benchmark rows: Markdown tables with speed-ups, a summary, PNG charts, and ``--compare``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

FUSED = ("fused-auto", "fused-triton", "fused-cuda", "triton", "cuda")
COMPILED = ("compile", "compile-max")
HEADLINE_MODES = ("fwd+bwd", "train", "infer")


def _key(row: dict) -> tuple:
    return row["bench"], row["shape"], row["mode"], row["dtype"]


def _grouped(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[_key(row)][row["provider"]] = row
    return groups


def _best(by_provider: dict[str, dict], names: tuple[str, ...]) -> tuple[str, float] | None:
    timed = [(p, r["p50_ms"]) for p, r in by_provider.items() if p in names and r.get("p50_ms")]
    return min(timed, key=lambda item: item[1]) if timed else None


def speedups(by_provider: dict[str, dict]) -> dict[str, object]:
    """The fused provider against eager and against the best compiled provider (ratios > 1: fused is faster):
    ``fused-auto`` where it was timed (what the model runs), else the best fused provider."""
    fused = _best(by_provider, ("fused-auto",)) or _best(by_provider, FUSED)
    eager = _best(by_provider, ("eager",))
    compiled = _best(by_provider, COMPILED)
    result: dict[str, object] = {"fused": fused[0] if fused else None}
    result["vs_eager"] = eager[1] / fused[1] if fused and eager else None
    result["vs_compile"] = compiled[1] / fused[1] if fused and compiled else None
    return result


def _ms(row: dict | None) -> str:
    if row is None:
        return ""
    if row.get("error"):
        return "error"
    return f"{row['p50_ms']:.3f}" if row.get("p50_ms") is not None else ""


def _ratio(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}×" + (" (slower)" if value < 1 else "")


def markdown(rows: list[dict]) -> str:
    """One table per suite: p50 ms per provider, speed-ups of the best fused provider, errors listed below."""
    if not rows:
        return "No rows.\n"
    env = rows[0]
    lines = [f"# Benchmarks — {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['git_sha']}, {env['date']}", ""]  # fmt: skip
    for suite in ("op", "connection", "backbone", "retinanet"):
        suite_rows = [r for r in rows if r["bench"].split(" ")[0] == suite]
        if not suite_rows:
            continue
        providers = list(dict.fromkeys(r["provider"] for r in suite_rows))
        header = ["bench", "shape", "mode", "dtype", *[f"{p} ms" for p in providers], "fused vs eager",
                  "fused vs compile", "kernels eager→fused", "peak MB eager→fused"]  # fmt: skip
        lines += [f"## {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, by_provider in _grouped(suite_rows).items():
            up = speedups(by_provider)
            eager, fused = by_provider.get("eager"), by_provider.get(up["fused"]) if up["fused"] else None
            kernels = f"{eager.get('kernels')}→{fused.get('kernels')}" if eager and fused else ""
            peak = (f"{eager['peak_mb']:.0f}→{fused['peak_mb']:.0f}"
                    if eager and fused and eager.get("peak_mb") is not None and fused.get("peak_mb") is not None
                    else "")  # fmt: skip
            cells = [*key, *[_ms(by_provider.get(p)) for p in providers], _ratio(up["vs_eager"]),
                     _ratio(up["vs_compile"]), kernels, peak]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {r['bench']} / {r['provider']} / {r['mode']} / {r['dtype']}: {r['error']}" for r in errors]
        lines.append("")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The README's short table: headline speed-ups per connection and model, 49/49S ratio, peak memory."""
    lines = ["| bench | shape | mode | dtype | fused vs eager | fused vs compile | peak MB eager→fused |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, by_provider in _grouped(rows).items():
        if key[2] not in HEADLINE_MODES or key[3] != "bfloat16" or key[0].startswith("op "):
            continue
        up = speedups(by_provider)
        eager, fused = by_provider.get("eager"), by_provider.get(up["fused"]) if up["fused"] else None
        peak = ""
        if eager and fused and eager.get("peak_mb") is not None and fused.get("peak_mb") is not None:
            peak = f"{eager['peak_mb']:.0f}→{fused['peak_mb']:.0f}"
        lines.append(f"| {' | '.join(key)} | {_ratio(up['vs_eager'])} | {_ratio(up['vs_compile'])} | {peak} |")
    ratios = _size_ratios(rows)
    if ratios:
        lines += ["", "SpineNet-49 / 49S time ratio (same provider, mode, batch): " + ", ".join(ratios)]
    return "\n".join(lines) + "\n"


def _size_ratios(rows: list[dict]) -> list[str]:
    times = {(r["bench"], r["provider"], r["mode"], r["shape"]): r["p50_ms"] for r in rows if r.get("p50_ms")}
    out = []
    for (bench, provider, mode, shape), t49 in times.items():
        if bench.endswith(" 49") and (small := times.get((bench[:-2] + "49S", provider, mode, shape))):
            out.append(f"{bench.split(' ')[0]} {provider} {mode} {shape}: {t49 / small:.2f}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of speed-ups (best fused vs eager and vs compile) for the headline modes in bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, vs_eager, vs_compile = [], [], []
    for key, by_provider in _grouped(rows).items():
        if key[2] not in HEADLINE_MODES and key[2] != "fwd":
            continue
        up = speedups(by_provider)
        if up["vs_eager"] is None:
            continue
        labels.append(f"{key[0]} {key[2]} {key[1]} {key[3]}")
        vs_eager.append(up["vs_eager"])
        vs_compile.append(up["vs_compile"] or math.nan)
    figure, axis = plt.subplots(figsize=(10, 0.3 * len(labels) + 1.5))
    positions = range(len(labels))
    axis.barh([p - 0.2 for p in positions], vs_eager, height=0.4, label="fused vs eager")
    axis.barh([p + 0.2 for p in positions], vs_compile, height=0.4, label="fused vs torch.compile")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.set_xlabel("speed-up (>1: fused is faster)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def compare(old_rows: list[dict], new_rows: list[dict]) -> str:
    """p50 of every row present in both runs, old → new, with the ratio (< 1: faster now)."""
    old = {(*_key(r), r["provider"]): r for r in old_rows if r.get("p50_ms")}
    lines = ["| bench | shape | mode | dtype | provider | old ms | new ms | new/old |", "|" + "---|" * 8]
    for row in new_rows:
        before = old.get((*_key(row), row["provider"]))
        if before and row.get("p50_ms"):
            ratio = row["p50_ms"] / before["p50_ms"]
            lines.append(f"| {' | '.join(_key(row))} | {row['provider']} | {before['p50_ms']:.3f} | "
                         f"{row['p50_ms']:.3f} | {ratio:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def load(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"]
