"""The launch ledger (``python -m benchmarks.ledger``): counts that do not depend on sizes, every part attributed,
eager launching no fused kernel and fused launching them. It runs in subprocesses: this test process imported the
kernels under the CPU interpreter, and the ledger intercepts real ``JITFunction`` launches."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from .conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("forward", "backward")


def ledger(out: Path, *args: str, model: str = "49XS-custom") -> dict:
    env = child_env(without=("TRITON_INTERPRET",))
    command = [sys.executable, "-m", "benchmarks.ledger", "--model", model, "--out", str(out), *args]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads((out / "ledger.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger128")
    return out, ledger(out, "--size", "128", "--batch", "2")


def test_counts_do_not_depend_on_image_size_or_batch(small, tmp_path):
    _, at_128 = small
    at_256 = ledger(tmp_path, "--size", "256", "--batch", "1")
    assert at_128["ledgers"] == at_256["ledgers"]
    assert at_128["summary"]["groups"] == at_256["summary"]["groups"]


def test_every_part_is_attributed_and_the_variants_launch_what_they_should(small):
    out, result = small
    eager, fused = result["ledgers"]["eager"], result["ledgers"]["fused-auto"]
    parts = set(eager)
    assert {"stem", "init_groups.0", "merges.0", "merges.0.resamples.0", "groups.0", "endpoints.p3", "loss"} <= parts
    assert "other" not in parts and "other" not in fused  # every launch has a part
    assert all(len(passes["backward"]) > 0 for part, passes in fused.items() if part.startswith("merges."))

    def kinds(ledger):
        return {op.split(" ")[0] for passes in ledger.values() for ops in passes.values() for op in ops}

    assert kinds(eager) == {"aten"}
    assert {"aten", "triton", "extension"} <= kinds(fused)
    # A same-level connection (expand_merge): per parent the squeeze GEMM and the expand's statistics GEMM forward,
    # the squeeze's backward; the merge its zeroed workspace and the GEMM that recomputes the expand outputs forward,
    # K1 and one K2 for both parents backward (they read dz at their resolution: once).
    assert fused["merges.0.resamples.0"] == {
        "forward": {"triton _conv1x1_fwd_kernel": 1, "triton _expand_stats_kernel": 1},
        "backward": {"triton _conv1x1_backward_kernel": 1},
    }
    assert fused["merges.0"] == {
        "forward": {"aten zeros": 1, "triton _expand_merge_fwd_kernel": 1},
        "backward": {"triton _expand_merge_k1_kernel": 1, "triton _expand_k2_kernel": 1},
    }
    # An upsampled parent beside a same-level one: each its own K2 (the upsampled one's of the block sums K1 stored).
    for parent in (0, 1):
        assert fused[f"merges.11.resamples.{parent}"]["backward"] == {
            "triton _conv1x1_backward_kernel": 1,
            "triton _expand_k2_kernel": 1,
        }
    assert fused["merges.11"]["backward"] == {"triton _expand_merge_k1_kernel": 1}
    # A bottleneck block: two 1×1 GEMMs, the 3×3 implicit GEMM and the merge of its output, each pass.
    block = fused["groups.3"]
    assert block["forward"] == {"aten zeros": 1, "triton _conv1x1_fwd_kernel": 2, "triton _conv3x3_fwd_kernel": 1,
                                "extension merge_forward": 1}  # fmt: skip
    assert block["backward"] == {
        "triton _conv1x1_backward_kernel": 2,
        "triton _conv3x3_backward_kernel": 1,
        "extension merge_backward": 1,
    }  # the input's two gradients (main path, shortcut) are summed by the producing merge's backward: no add
    assert "aten convolution" in eager["groups.3"]["forward"]
    # An endpoint: the 1×1 conv + BN (statistics in its epilogue) and BN + activation as a single-parent merge.
    for name in ("p3", "p7"):
        assert fused[f"endpoints.{name}"] == {
            "forward": {"aten zeros": 1, "triton _conv1x1_fwd_kernel": 1, "extension merge_forward": 1},
            "backward": {"extension merge_backward": 1, "triton _conv1x1_backward_kernel": 1},
        }

    # The stem: the image's cast, the 7×7 implicit GEMM (statistics in its epilogue, BN finalised by its last
    # program) and BN + activation + max-pool in one pass; eager also launches the weight's cast, BN, act and pool.
    assert fused["stem"] == {
        "forward": {"aten _to_copy": 1, "aten zeros": 1, "triton _conv3x3_fwd_kernel": 1,
                    "extension maxpool_forward": 1},
        "backward": {"extension maxpool_backward": 1, "triton _conv3x3_backward_kernel": 1},
    }  # fmt: skip
    assert sum(eager["stem"]["forward"].values()) == 7 and sum(eager["stem"]["backward"].values()) == 5

    # Autograd adds the gradients of a map several modules read: eager, one add per extra reader (37); fused, only
    # the eager stem's output (read by the first block's main path and shortcut) — every block output and block
    # input is a merge's, returned once per reader (ops.merge_for_readers).
    def adds(ledger):
        return {part: ops["backward"]["aten add"] for part, ops in ledger.items() if "aten add" in ops["backward"]}

    assert sum(adds(eager).values()) == 37 and adds(fused) == {"init_groups.0": 1}
    groups = {row["part"]: row for row in result["summary"]["groups"]}
    assert groups["total"]["eager forward"] == sum(sum(p["forward"].values()) for p in eager.values())
    markdown = (out / "ledger.md").read_text()
    assert "| cross-scale parents |" in markdown and "L5->L3 up" in markdown
    assert (out / "ledger.png").read_bytes()[:4] == b"\x89PNG"


def test_a_projected_bottleneck_pairs_its_input_convs(tmp_path):
    """SpineNet-49's first block (64 -> 256 channels: a projection shortcut) runs its first conv and its shortcut as one
    ``conv1x1_bn_pair``: one backward launch for both convs, whose dgrad stores the stem output's gradient once (no
    autograd add of two), beside the other 1×1, the 3×3 and the block merge."""
    result = ledger(tmp_path, "--size", "128", "--batch", "2", model="49")
    assert result["ledgers"]["fused-auto"]["init_groups.0"]["backward"] == {
        "triton _conv1x1_pair_backward_kernel": 1,
        "triton _conv1x1_backward_kernel": 1,
        "triton _conv3x3_backward_kernel": 1,
        "extension merge_backward": 1,
    }
    assert "aten add" in result["ledgers"]["eager"]["init_groups.0"]["backward"]


def test_stochastic_depth_is_the_block_merges_row_scale(small, tmp_path):
    """Stochastic depth at the models' training default (0.2) in the fused blocks: per block (49XS-custom's groups
    hold one each) its two per-sample launches — the Bernoulli draw, the 1/(1 - p) scaling — and nothing else in
    either pass (the block merge scales the branch per sample); eager adds a full-size multiply to each pass."""
    _, without = small
    with_depth = ledger(tmp_path, "--size", "128", "--batch", "2", "--stochastic-depth-rate", "0.2")
    added = {
        "eager": ({"aten bernoulli_": 1, "aten div_": 1, "aten mul": 1}, {"aten mul": 1}),
        "fused-auto": ({"aten bernoulli_": 1, "aten div": 1}, {}),
    }
    for variant, (forward, backward) in added.items():
        got, base = with_depth["ledgers"][variant], without["ledgers"][variant]
        assert got.keys() == base.keys()
        for part in got:
            for pass_, extra in (("forward", forward), ("backward", backward)):
                want = Counter(base[part][pass_]) + Counter(extra if part.startswith("groups.") else {})
                assert Counter(got[part][pass_]) == want, (variant, part, pass_)


def fused_launches(ledger: dict, part: str, pass_: str) -> int:
    return sum(ledger.get(part, {}).get(pass_, {}).values())


def assert_connection_launch_budgets(fused: dict) -> None:
    """fused_ops.md §7's budgets of a fused ledger's connections: per parent ≤ 3 launches forward and ≤ 5 backward
    (upsampling and same-level parents ≤ 2 each), per merge ≤ 2 per pass, none of the forbidden reductions, copies,
    casts or fills."""
    from benchmarks.ledger import FORBIDDEN

    parents = [part for part in fused if ".resamples." in part]
    merges = [part for part in fused if part.startswith("merges.") and ".resamples." not in part]
    assert len(parents) == 30 and len(merges) == 15
    for part in parents:
        forward, backward = (fused_launches(fused, part, pass_) for pass_ in ("forward", "backward"))
        downsampling = any("conv3x3" in op for op in fused[part]["forward"])
        assert forward <= (3 if downsampling else 2) and backward <= (5 if downsampling else 2), part
    for part in merges:
        assert fused_launches(fused, part, "forward") <= 2 and fused_launches(fused, part, "backward") <= 2, part
    for part in parents + merges:
        for ops in fused[part].values():
            assert not [op for op in ops if op.startswith(FORBIDDEN)], part


def test_fused_launch_budgets(small):
    """fused_ops.md §7: per parent ≤ 3 launches forward and ≤ 5 backward, per merge ≤ 2 per pass (BN finalisation
    of all its parents included), none of the forbidden reductions, copies, casts or fills in either pass; and a
    ratchet below the budgets: upsampling and same-level parents ≤ 2 forward and ≤ 2 backward, the fused backbone
    fewer launches than eager in both passes (lower these as kernels land)."""
    _, result = small
    eager, fused = result["ledgers"]["eager"], result["ledgers"]["fused-auto"]
    assert_connection_launch_budgets(fused)
    for pass_ in ("forward", "backward"):
        total = {name: sum(fused_launches(ledger, part, pass_) for part in ledger) for name, ledger in
                 (("eager", eager), ("fused", fused))}  # fmt: skip
        assert total["fused"] < total["eager"], pass_


def test_fused_backbone_launches_at_most_half_of_eager(small):
    """fused_ops.md §7: the whole backbone's training step fused ≤ 0.5× eager's launches, in each pass."""
    _, result = small
    eager, fused = result["ledgers"]["eager"], result["ledgers"]["fused-auto"]
    for pass_ in ("forward", "backward"):
        total = {name: sum(fused_launches(ledger, part, pass_) for part in ledger) for name, ledger in
                 (("eager", eager), ("fused", fused))}  # fmt: skip
        assert total["fused"] <= 0.5 * total["eager"], pass_


def test_modelled_traffic(small):
    """Bytes and FLOPs are modelled for every variant; our GEMM kernels' FLOPs are counted (the fused forward does the
    eager forward's GEMM work less the expand convs run at the parents' lower resolution, plus the expand GEMMs that
    ``expand_merge`` recomputes instead of storing their outputs: within 10% of eager's); each block connection has
    its byte floor and its BN-barrier bound above it, which no variant beats; the markdown shows the tables."""
    out, result = small
    traffic = result["summary"]["traffic"]
    flops = traffic["flops"]
    assert 0.8 * flops["eager forward"] < flops["fused-auto forward"] <= 1.1 * flops["eager forward"]
    assert flops["fused-auto backward"] >= flops["eager backward"] * 0.8
    # each dgrad one dot of the once-rounded gradient (two had put SpineNet-49's backward at 1.53× eager's; 1.10× now)
    assert flops["fused-auto backward"] <= 1.25 * flops["eager backward"], flops
    groups = {row["part"]: row for row in traffic["bytes"]}
    totals = groups["total"]
    assert all(totals[f"{v} {p}"] > 0 for v in ("eager", "fused-auto") for p in ("forward", "backward"))
    for p in ("forward", "backward"):  # the fused endpoints and stem: no normalised map written and read again
        assert groups["endpoints"][f"fused-auto {p}"] < groups["endpoints"][f"eager {p}"], p
        assert groups["stem"][f"fused-auto {p}"] < groups["stem"][f"eager {p}"], p
    atomics = traffic["atomics"]  # our backward kernels' tile reductions into L2; eager launches none of ours
    assert atomics["fused-auto backward"] > 0 == atomics["eager backward"] == atomics["eager forward"]
    assert "_expand_k2_kernel" in traffic["atomic_kernels"]["fused-auto"]
    connections = traffic["connections"]
    merges = [part for part in result["ledgers"]["eager"] if part.startswith("merges.") and part.count(".") == 1]
    assert len(connections) == len(merges) > 0
    for row in connections:
        for p in ("forward", "backward"):
            assert 0 < row[f"floor {p}"] < row[f"bound {p}"] <= min(row[f"eager {p}"], row[f"fused-auto {p}"]), (
                row["part"], p)  # fmt: skip
    assert "| merges.0 | " in (out / "ledger.md").read_text()


def test_convolution_backward_is_one_kernel_per_gradient():
    """cuDNN runs a conv's input and weight gradients as separate kernels, each reading the output gradient."""
    from benchmarks._traffic import aten_kernels, tensor_bytes

    x, w = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(6, 4, 3, 3)
    dy = torch.randn(2, 6, 8, 8)
    op = torch.ops.aten.convolution_backward.default
    for mask, names in (([True, True, False], ["dgrad", "wgrad"]), ([False, True, False], ["wgrad"])):
        args = (dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
        out = op(*args)
        kernels = aten_kernels("convolution_backward", op, args, {}, out)
        assert [name.split()[-1] for name, _, _ in kernels] == names
        assert kernels[-1][1] == tensor_bytes(dy) + tensor_bytes(x) + tensor_bytes(w)  # wgrad: dy, x in, dW out
        assert kernels[0][2] == 2 * 2 * 6 * 64 * 4 * 9  # each GEMM: the forward's multiply-adds
    (kernel,) = aten_kernels("add", torch.ops.aten.add.Tensor, (dy, dy), {}, dy + dy)
    assert kernel[:2] == ("add", 2 * tensor_bytes(dy))


def test_tensor_bytes_counts_each_addressed_element_once():
    from benchmarks._traffic import tensor_bytes, tensors_bytes

    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert tensor_bytes(x) == 64
    assert tensor_bytes(x[:, ::2]) == 32
    assert tensor_bytes(torch.zeros(8).expand(4, 8)) == 32  # a broadcast row is read once
    assert tensors_bytes([x, x], {"y": x[0]}) == 64 + 16  # the same tensor object once


def test_every_readers_gradient_is_read():
    """The merge kernels sum their output's readers' gradients, addressed as offsets from the first: each is read."""
    from types import SimpleNamespace

    from benchmarks._traffic import tensor_bytes, triton_traffic

    grads, out = torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4)
    kernel = SimpleNamespace(arg_names=["out_ptr", "grad_ptr", "g1_delta", "NUM_GRADS"],
                             fn=SimpleNamespace(__name__="_merge_bwd_kernel"))  # fmt: skip
    for readers in (1, 2):
        nbytes, _, _ = triton_traffic(kernel, (out, grads[0], grads[1].data_ptr() - grads[0].data_ptr()),
                                      {"NUM_GRADS": readers})  # fmt: skip
        assert nbytes == tensor_bytes(out) + readers * tensor_bytes(grads[0])


@pytest.fixture(scope="module")
def budget_setting(tmp_path_factory) -> dict:
    """The ledger's traffic at fused_ops.md §7's setting: SpineNet-49, 640 px, batch 8, bf16."""
    out = tmp_path_factory.mktemp("ledger640")
    env = child_env(without=("TRITON_INTERPRET",))
    command = [sys.executable, "-m", "benchmarks.ledger", "--model", "49", "--size", "640", "--batch", "8",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=900)
    return json.loads((out / "ledger.json").read_text())["summary"]["traffic"]


@pytest.mark.slow
def test_every_fused_connection_moves_fewer_bytes_than_eager(budget_setting):
    """The guide's claim of a fused path, at the budgets' setting: each block connection (merge and parents) moves
    fewer modelled bytes fused than eager, forward and backward (a ratchet below the budgets)."""
    for row in budget_setting["connections"]:
        for p in ("forward", "backward"):
            assert row[f"fused-auto {p}"] < row[f"eager {p}"], (row["part"], p)


@pytest.mark.slow
def test_fused_backbone_step_byte_budget(budget_setting):
    """fused_ops.md §7 at its stated setting: the backbone's training step fused ≤ 0.7× eager's modelled bytes."""
    totals = {row["part"]: row for row in budget_setting["bytes"]}["total"]
    fused = totals["fused-auto forward"] + totals["fused-auto backward"]
    assert fused <= 0.7 * (totals["eager forward"] + totals["eager backward"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 15: merges.4, 7 and 8 forward, seven connections backward (below)")
def test_fused_connection_byte_budgets(budget_setting):
    """fused_ops.md §7 at its stated setting: every block connection ≤ 1.5× its byte floor forward and ≤ 2×
    backward (1.21–2.25× and 1.52–3.18× today). merges.7's forward cannot get there: its BN-barrier bound is 1.70×
    (``test_the_barrier_bound_puts_one_budget_out_of_reach``)."""
    for row in budget_setting["connections"]:
        assert row["fused-auto forward"] <= 1.5 * row["floor forward"], row["part"]
        assert row["fused-auto backward"] <= 2 * row["floor backward"], row["part"]


@pytest.mark.slow
def test_the_barrier_bound_puts_one_budget_out_of_reach(budget_setting):
    """``_traffic.barrier_bound``: under training-mode BN no kernels can move less. At the budgets' setting it is
    above the budget for merges.7's forward alone (an L7 output of an L6 and an L5 parent: storing or recomputing
    their squeeze and stride-2 conv outputs costs 0.7× the floor, whose fp32 weights are nearly half of it), and no
    fused connection moves less than its bound."""
    out_of_reach = {
        (row["part"], p)
        for row in budget_setting["connections"]
        for p, limit in (("forward", 1.5), ("backward", 2))
        if row[f"bound {p}"] > limit * row[f"floor {p}"]
    }
    assert out_of_reach == {("merges.7", "forward")}
    for row in budget_setting["connections"]:
        for p in ("forward", "backward"):
            assert row[f"fused-auto {p}"] >= row[f"bound {p}"], (row["part"], p)


@pytest.mark.slow
def test_connections_over_their_byte_budgets(budget_setting):
    """A ratchet below those budgets: only these connections are over them — forward merges.4 and 7 (L6, L7 outputs:
    their parents' squeeze and stride-2 conv outputs must be written and read again, as those BNs need all of them
    first) and merges.8 (1.53×: its forward zeroes its expand weights' fp32 gradients); backward the seven where the
    gradient at the output, C channels wide at its resolution, is read by K1 (both readers' tensors), stored (dz) and
    read again by K2 (1.52–3.18×;
    K1 projecting dz onto each parent's squeezed channels instead moved 0.57 GB less but added 4.5 GB of atomic adds
    into L2: ``_traffic.TRITON_ATOMICS``)."""
    over = {
        p: {row["part"] for row in budget_setting["connections"] if row[f"fused-auto {p}"] > limit * row[f"floor {p}"]}
        for p, limit in (("forward", 1.5), ("backward", 2))
    }
    backward = {f"merges.{k}" for k in (2, 5, 7, 8, 9, 10, 11)}
    assert over["forward"] <= {"merges.4", "merges.7", "merges.8"} and over["backward"] <= backward, over


@pytest.fixture(scope="module")
def detector_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger_head")
    return out, ledger(out, "--head", "--size", "128", "--batch", "2")


def rows_by_part(rows: list[dict]) -> dict[str, dict]:
    return {row["part"]: row for row in rows}


def test_detector_step_parts_and_the_fused_loss(detector_step, tmp_path):
    """``--head``: the RetinaNet step's parts are all attributed; the loss (batched matching and the fused loss op,
    one kernel per pass) launches ≤ 0.4× torchvision's per-image loss and moves ≤ 0.1× its modelled bytes, whatever
    the batch size; the head's launches, exactly."""
    out, result = detector_step
    eager, fused = result["ledgers"]["eager"], result["ledgers"]["fused-auto"]
    assert {"transform", "anchors", "head", "loss", "merges.0.resamples.0"} <= set(eager) & set(fused)
    assert not fused.get("other", {}).get("backward")  # every backward launch has a part
    assert fused["loss"]["forward"]["triton _retinanet_loss_kernel"] == 1
    assert fused["loss"]["backward"]["triton _retinanet_loss_kernel"] == 1
    assert not any("retinanet_loss" in op for passes in eager.values() for ops in passes.values() for op in ops)
    # The fused head: one implicit GEMM for all five levels per tower layer or predictor and pass; the features packed
    # once (one cat), one zeroed statistics buffer per tower; per backward launch its one zeroed buffer of dW, d_bias
    # and the prologue's gradients; the features' two tower gradients added once (packed).
    gemms = 2 * (4 + 1)  # (class, box) × (4 tower convs, predictor)
    assert fused["head"] == {
        "forward": {"aten cat": 1, "aten zeros": 2, "triton _conv3x3_levels_fwd_kernel": gemms},
        "backward": {"aten zeros": gemms, "triton _conv3x3_levels_backward_kernel": gemms, "aten add": 1},
    }  # fmt: skip
    assert not any("convolution" in op or "batch_norm" in op for ops in fused["head"].values() for op in ops)
    flops = result["summary"]["traffic"]["flops"]  # the head's GEMMs counted too: the fused step does eager's work
    assert 0.9 * flops["eager forward"] <= flops["fused-auto forward"] <= 1.1 * flops["eager forward"]
    launches = rows_by_part(result["summary"]["groups"])["loss (matching, focal and box losses)"]
    traffic = rows_by_part(result["summary"]["traffic"]["bytes"])["loss (matching, focal and box losses)"]
    for p in ("forward", "backward"):
        assert 0 < launches[f"fused-auto {p}"] <= 0.4 * launches[f"eager {p}"], p
        assert 0 < traffic[f"fused-auto {p}"] <= 0.1 * traffic[f"eager {p}"], p
    larger = ledger(tmp_path, "--head", "--size", "256", "--batch", "3")["ledgers"]["fused-auto"]
    assert larger["loss"] == fused["loss"]
    assert "| loss (matching, focal and box losses) |" in (out / "ledger.md").read_text()


def test_saved_activation_memory(detector_step):
    """The ledger reports the activation memory saved for backward per part: the fused loss saves its inputs only
    (no one-hot targets, probabilities or fp32 copies: ≤ 0.1× eager's), the fused connections less than eager's."""
    _, result = detector_step
    saved = rows_by_part(result["summary"]["saved"])
    loss = saved["loss (matching, focal and box losses)"]
    assert 0 < loss["fused-auto"] <= 0.1 * loss["eager"]
    assert saved["cross-scale parents"]["fused-auto"] < saved["cross-scale parents"]["eager"]
    assert 0 < saved["blocks"]["fused-auto"] < saved["blocks"]["eager"]
    assert 0 < saved["stem"]["fused-auto"] < saved["stem"]["eager"]  # no normalised or activated map kept
    head = saved["head (class and box towers, predictors)"]
    assert 0 < head["fused-auto"] < head["eager"]
    assert saved["total"]["fused-auto"] < saved["total"]["eager"]


def test_fused_detector_step_launch_budget(detector_step):
    """Issue 16: the whole RetinaNet training step fused ≤ 0.35× eager's launches (size-independent: checked small)."""
    _, result = detector_step
    launches = rows_by_part(result["summary"]["groups"])["total"]
    assert sum(launches[f"fused-auto {p}"] for p in PASSES) <= 0.35 * sum(launches[f"eager {p}"] for p in PASSES)


def test_frozen_norms_training_step(tmp_path):
    """``--frozen-norms``: a training step with every BatchNorm in eval mode (fine-tuning with frozen statistics,
    trainable γ and β). The maps of all the norms are four launches forward and two backward (``_RunningAffines``;
    autograd's formulas for the foreach ops took 520 for SpineNet-49's 130 norms); the backward fills nothing — each
    module's frozen convs, max-pools and merge take their accumulators (dW, the prologues' gradients, the channel sums
    of the frozen BNs' dγ, dβ) from its one forward workspace fill, as in training mode, and no conv fills or folds a
    gradient for statistics it did not take. Each connection's expand convs, their maps and its merge are one
    ``expand_merge_affine`` (forward one launch; backward K1 and a K2 per parents' level), within fused_ops.md §7's
    budgets. The fused step launches fewer kernels and moves fewer modelled bytes than eager in both passes: backward
    ≤ 0.3× its launches (0.28× today; 0.29× with the expand convs and the merge apart, 0.81× while each frozen conv's
    backward filled its accumulators and a zero statistics gradient, and read y to fold it in), no more part by part
    — the connections (parents and merges) together: the expand convs' backward, eager's in its parents, runs in the
    merge's K1 and, for two parents at the block's level, its shared K2."""
    result = ledger(tmp_path, "--frozen-norms", "--size", "128", "--batch", "2")
    assert result["config"]["step"].startswith("training step with frozen BatchNorms")
    fused = result["ledgers"]["fused-auto"]
    assert fused["norm affines"]["backward"] == {"aten _foreach_addcmul": 1, "aten _foreach_mul_": 1}
    fills = {part: [k for k in ops.get("backward", {}) if "zero" in k or "fill" in k] for part, ops in fused.items()}
    assert not any(fills.values()), fills
    summary = result["summary"]
    for rows in (summary["groups"], summary["traffic"]["bytes"]):
        total = rows_by_part(rows)["total"]
        for p in PASSES:
            assert total[f"fused-auto {p}"] < total[f"eager {p}"], p
    assert_connection_launch_budgets(fused)
    assert all(fused[f"merges.{k}"]["forward"].get("triton _expand_merge_fwd_kernel") == 1 for k in range(15))
    launches = rows_by_part(summary["groups"])  # (bytes part by part: at 640 px, batch 8 — weights weigh more here)
    connections = ("cross-scale parents", "merges (sum, activation, extras)")
    for part in ("stem", "initial blocks", "blocks", "endpoints", connections):
        parts = part if isinstance(part, tuple) else (part,)
        fused_backward, eager_backward = (sum(launches[p][f"{name} backward"] for p in parts)
                                          for name in ("fused-auto", "eager"))  # fmt: skip
        assert fused_backward <= eager_backward, part
    assert launches["total"]["fused-auto backward"] <= 0.3 * launches["total"]["eager backward"]


def test_frozen_norms_detector_head(tmp_path):
    """``--frozen-norms --head``: the head's running-statistics maps, computed stacked for all its tower layers and
    levels, are split into each layer's rows at once — their backward one concatenation per map, not a slice and an
    add per layer (16 of each for RetinaNet's eight tower layers) — and the head's backward launches ≤ 3 per layer
    (each layer's kernel and its one fill, the maps' few)."""
    result = ledger(tmp_path, "--frozen-norms", "--head", "--size", "128", "--batch", "2")
    head = result["ledgers"]["fused-auto"]["head"]["backward"]
    assert "aten slice_backward" not in head and head.get("aten cat") == 2, head
    layers = head["triton _conv3x3_levels_backward_kernel"]
    assert sum(head.values()) <= 3 * layers, head


def test_frozen_norms_is_a_training_step_setting(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as raised:
        ledger(tmp_path, "--frozen-norms", "--inference")
    assert "--frozen-norms is a training step's setting" in raised.value.stderr


@pytest.fixture(scope="module")
def inference(tmp_path_factory) -> dict:
    return ledger(tmp_path_factory.mktemp("ledger_inference"), "--inference", "--head", "--size", "128", "--batch", "2")


def test_inference_forward(inference):
    """``--inference --head``: one eval-mode forward of the backbone and the head, no backward. Fused, every BN is an
    affine map of its running statistics — all the backbone's computed at once (four foreach launches, their own
    part), all the head's at once (four stacks, four elementwise) — and the convs take no statistics (no fill, sum
    or stack in the backbone); each connection's expand convs, their maps and its merge are one launch
    (``expand_merge_affine``'s kernel, after its parents' squeezes, stride-2 convs and max-pools); every part launches
    fewer kernels and moves fewer modelled bytes than eager, ≤ 0.25× its launches and ≤ 0.45× its bytes in all (0.24×,
    0.41× today)."""
    eager, fused = inference["ledgers"]["eager"], inference["ledgers"]["fused-auto"]
    assert all(set(passes) == {"forward"} for ledger in (eager, fused) for passes in ledger.values())
    assert fused["norm affines"]["forward"] == {f"aten _foreach_{op}": 1 for op in ("add", "rsqrt", "mul", "addcmul")}
    assert "norm affines" not in eager
    merges = {part: passes["forward"] for part, passes in fused.items() if re.fullmatch(r"merges\.\d+", part)}
    assert len(merges) == 15 and all(m == {"triton _expand_merge_fwd_kernel": 1} for m in merges.values()), merges
    head = fused["head"]["forward"]
    assert head["aten stack"] == 4 and head["triton _conv3x3_levels_fwd_kernel"] == 10
    backbone = Counter()
    for part, passes in fused.items():
        if part not in ("head", "norm affines"):
            backbone.update(passes["forward"])
    assert not {op for op in backbone if op.split()[-1] in ("zeros", "sum", "stack", "rsqrt", "native_batch_norm")}
    summary = inference["summary"]
    for rows, limit in ((summary["groups"], 0.25), (summary["traffic"]["bytes"], 0.45)):
        for row in rows:
            if not row["part"].startswith("norm affines"):
                assert row["fused-auto forward"] < row["eager forward"], row["part"]
        total = rows_by_part(rows)["total"]
        assert total["fused-auto forward"] <= limit * total["eager forward"]


@pytest.fixture(scope="module")
def detector_budget_setting(tmp_path_factory) -> dict:
    """The RetinaNet-49 training step at issue 16's setting: 640 px, batch 8, bf16."""
    out = tmp_path_factory.mktemp("ledger_head640")
    env = child_env(without=("TRITON_INTERPRET",))
    command = [sys.executable, "-m", "benchmarks.ledger", "--model", "49", "--head", "--size", "640", "--batch", "8",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=900)
    return json.loads((out / "ledger.json").read_text())["summary"]


@pytest.mark.slow
def test_fused_detector_step_saves_at_most_0_7_of_eager_activation_memory(detector_budget_setting):
    """Issue 16: saved activation memory of the RetinaNet-49 step fused ≤ 0.7× eager's (the fused loss saves its
    inputs only; the fused connections their raw GEMM outputs and statistics)."""
    saved = rows_by_part(detector_budget_setting["saved"])["total"]
    assert saved["fused-auto"] <= 0.7 * saved["eager"]


@pytest.mark.slow
def test_fused_detector_step_byte_budget(detector_budget_setting):
    """Issue 16: the RetinaNet-49 step fused ≤ 0.6× eager's modelled bytes, both passes together."""
    traffic = rows_by_part(detector_budget_setting["traffic"]["bytes"])["total"]
    assert sum(traffic[f"fused-auto {p}"] for p in PASSES) <= 0.6 * sum(traffic[f"eager {p}"] for p in PASSES)


@pytest.fixture(scope="module")
def mobile(tmp_path_factory) -> dict:
    """SpineNet-Mobile-49's backbone step at its official setting (384 px), batch 8, bf16 (a few seconds)."""
    return ledger(tmp_path_factory.mktemp("ledger_mobile"), "--size", "384", "--batch", "8", model="mobile-49")


def test_mobile_connection_launch_budgets(mobile):
    """Issue 19, fused_ops.md §7's budgets for SpineNet-Mobile's connections (each one ``expand_merge`` after its
    depthwise convs): per parent one launch per depthwise 3×3/s2 conv + BN layer in each pass (its BN statistics,
    finalize and the previous BN + act as its prologue), and its share of ``expand_merge``: the 1×1 conv's statistics
    GEMM forward, at most one K2 backward (an upsampled parent's, or the one parent at the block's level); per merge
    ≤ 2 launches in each pass (the workspace's fill and the merge GEMM; K1 and the K2 that two parents at the block's
    level share) — plus, in the backward, the adds autograd makes of a raw parent's gradients from its readers (an
    MBConv block's output read by several blocks, as in eager); none of the forbidden launches; the connections fused
    ≤ 0.35× eager's launches in each pass."""
    from benchmarks.ledger import FORBIDDEN

    eager, fused = mobile["ledgers"]["eager"], mobile["ledgers"]["fused-auto"]
    parents = [part for part in fused if ".resamples." in part]
    merges = [part for part in fused if part.startswith("merges.") and ".resamples." not in part]
    assert len(parents) == 32 and len(merges) == 16
    for part in parents:
        forward = fused[part]["forward"]
        depthwise = forward.get("triton _depthwise3x3_fwd_kernel", 0)
        assert forward == {"triton _expand_stats_kernel": 1, **({"triton _depthwise3x3_fwd_kernel": depthwise}
                                                                  if depthwise else {})}, part  # fmt: skip
        backward = Counter(fused[part]["backward"])
        backward.pop("aten add", None)
        assert backward.pop("triton _depthwise3x3_backward_kernel", 0) == depthwise, part
        assert set(backward) <= {"triton _expand_k2_kernel"} and sum(backward.values()) <= 1, part
    for part in merges:
        backward = Counter(fused[part]["backward"])
        backward.pop("aten add", None)
        assert fused_launches(fused, part, "forward") <= 2 and sum(backward.values()) <= 2, part
    for part in parents + merges:
        for ops in fused[part].values():
            assert not [op for op in ops if op.startswith(FORBIDDEN)], part
    for pass_ in PASSES:
        connections = {name: sum(fused_launches(ledger, part, pass_) for part in ledger if part.startswith("merges."))
                       for name, ledger in (("eager", eager), ("fused", fused))}  # fmt: skip
        assert connections["fused"] <= 0.35 * connections["eager"], (pass_, connections)


def test_mobile_connections_move_fewer_bytes_than_eager(mobile):
    """Modelled bytes at the official setting: every Mobile block connection (merge and parents) fused moves fewer
    bytes than eager in each pass, and all of them together ≤ 0.3× eager's forward and ≤ 0.55× its backward (0.28×
    and 0.50× today; a ratchet)."""
    traffic = mobile["summary"]["traffic"]
    totals = Counter()
    for row in traffic["connections"]:
        for p in PASSES:
            assert row[f"fused-auto {p}"] < row[f"eager {p}"], (row["part"], p)
            totals.update({f"{v} {p}": row[f"{v} {p}"] for v in ("eager", "fused-auto")})
    assert totals["fused-auto forward"] <= 0.3 * totals["eager forward"]
    assert totals["fused-auto backward"] <= 0.55 * totals["eager backward"]


def test_the_barrier_bound_puts_mobile_forward_budgets_out_of_reach(mobile):
    """``_traffic.barrier_bound`` for the Mobile connections: the forward budget (1.5×) is out of reach for all but
    merges.8 and 9 — a 1×1 conv's BN needs all of its output first, and its input (the raw parent, about as wide as
    the output at the parent's resolution, or the last depthwise conv's output) costs less read again than the output
    stored — while every backward bound is under 2×; no variant moves less than its bound, and the five largest
    connections' fused forward (merges.0–4, 74% of the forward floor) is within 2% of the floor of it (the small
    L6/L7 ones are further: their fp32 weights, read by both GEMMs, and their workspace's fill weigh more)."""
    out_of_reach = {
        (row["part"], p)
        for row in mobile["summary"]["traffic"]["connections"]
        for p, limit in (("forward", 1.5), ("backward", 2))
        if row[f"bound {p}"] > limit * row[f"floor {p}"]
    }
    assert out_of_reach == {(f"merges.{k}", "forward") for k in range(16) if k not in (8, 9)}
    for row in mobile["summary"]["traffic"]["connections"]:
        for p in ("forward", "backward"):
            assert row[f"floor {p}"] < row[f"bound {p}"] <= min(row[f"eager {p}"], row[f"fused-auto {p}"]), row["part"]
        if row["part"] in {f"merges.{k}" for k in range(5)}:
            assert row["fused-auto forward"] <= row["bound forward"] + 0.02 * row["floor forward"], row["part"]


@pytest.mark.xfail(strict=True, reason="issue 15: forward, the BN-barrier bound (above); backward, autograd's sums of "
                   "the raw parents' gradients from their readers (eager MBConv outputs)")  # fmt: skip
def test_mobile_connection_byte_budgets(mobile):
    """fused_ops.md §7's byte budgets for the Mobile connections: ≤ 1.5× the floor forward, ≤ 2× backward (1.55–2.04×
    and 1.72–3.16× today, each one ``expand_merge``; 1.8–2.3× and 2.0–4.2× with ``conv1x1_bn`` + ``merge``). Backward
    they are over only by the adds autograd makes of a parent's gradients where several blocks read it (26% of the
    connections' backward bytes; without them 1.60–1.99×): the parents are eager MBConv blocks' outputs, whose
    readers' gradients a fused block would sum as it loads them, as SpineNet's fused blocks do."""
    for row in mobile["summary"]["traffic"]["connections"]:
        assert row["fused-auto forward"] <= 1.5 * row["floor forward"], row["part"]
        assert row["fused-auto backward"] <= 2 * row["floor backward"], row["part"]
