"""scripts/bench_train.py's verdict on issue 19's targets, which depend on the kind of CPU."""

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
