"""scripts/bench_train.py's verdicts on issue 19's targets (which depend on the kind of CPU) and issue 31's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_train import targets  # noqa: E402

RESULTS = {"default": {"tokens_per_s": 130.0, "utilisation": 0.56}, "plain": {"tokens_per_s": 100.0}}


def test_a_cpu_with_bf16_units_must_reach_1_5x_the_plain_script(amx_cpu):
    verdict = targets(RESULTS, "cpu")
    assert "(AMX)" in verdict and "at least 1.5x the plain script's tokens/s: 1.30x, NOT met" in verdict
    assert "at least 50%: 56%, met" in verdict


def test_units_out_of_onednns_reach_are_held_to_the_avx2_target(amx_cpu, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    verdict = targets(RESULTS, "cpu")
    assert "(no bf16 units within ONEDNN_MAX_CPU_ISA=AVX2)" in verdict
    assert "at least 1.1x the plain script's tokens/s: 1.30x, met" in verdict


def test_no_verdict_without_both_setups_or_off_the_cpu(amx_cpu):
    assert targets({"default": RESULTS["default"]}, "cpu") == ""
    assert targets(RESULTS, "cuda") == ""


def test_the_loss_paths_verdict_is_read_at_the_longest_row():
    """Issue 31: chunked allocated peak at most half the plain one, tokens/s (and per CPU-second) within 10%."""
    from bench_train import loss_paths_targets

    plain = {"allocated_peak": 4.0, "tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0, "loss_peak": 2400.0}
    chunked = {"allocated_peak": 1.6, "tokens_per_s": 95.0, "tokens_per_cpu_s": 49.0, "loss_peak": 86.0}
    results = {(4096, "plain"): plain, (4096, "chunked"): chunked}
    verdict = loss_paths_targets(results, 4096)
    assert "at most 0.5x the plain one: 0.40x, met (the loss alone: 0.04x)" in verdict
    assert "tokens/s within 10% of plain: 0.95x (per CPU-second 0.98x), met" in verdict
    chunked |= {"allocated_peak": 2.4, "tokens_per_cpu_s": 40.0}
    missed = loss_paths_targets(results, 4096)
    assert "0.60x, NOT met" in missed and "(per CPU-second 0.80x), NOT met" in missed
    assert loss_paths_targets(results, 2048) == ""
