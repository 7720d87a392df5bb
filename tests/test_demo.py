"""`make demo` as shipped: the embedded recipe, unchanged, must really teach the tiny model something."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli


def test_the_demo_recipe_lifts_exact_match_on_held_out_prompts(tmp_path):
    """The one test that runs the full demo (about 2.5 min on 2 cores): seeds 0 and 1 measured 48% and 53%."""
    out = tmp_path / "demo"
    result = run_cli("train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    # on AVX512-BF16 CPUs: training through bitsandbytes' fused inference kernel, and its `kernels` lookup
    assert "autograd kernel was not registered" not in result.stderr
    assert "kernels-community" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_match_samples"] == 64
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.3, metrics
    before, after = (100 * metrics[f"exact_match_{when}"] for when in ("before", "after"))
    assert f"Exact match on 64 held-out prompts: {before:.1f}% before -> {after:.1f}% after" in result.stdout
