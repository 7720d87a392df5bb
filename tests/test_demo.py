"""`make demo` as shipped: the recipe, unchanged, must teach the real model its task and leave what it knew."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli


def test_the_demo_recipe_teaches_smollm2_to_reverse_words_and_it_keeps_what_it_knew(tmp_path):
    """The one test that runs the full demo (the README's timings: 2.5-3 min on 2 AMD EPYC cores). Exact match on
    the first 32 held-out prompts 0% -> 93.8% in bf16 and capped at AVX2 (fp32); on 64 prompts, seeds 42, 0, 1
    (bf16) and 42, 0 (capped) measured 0% -> 90.6-98.4%. Held-out loss 3.11-3.21 -> 0.022-0.030, general
    questions 8/8 -> 8/8 in bf16 and 8/8 -> 7/8 capped (the largest planet: Jupiter -> Neptune)."""
    out = tmp_path / "demo"
    result = run_cli("train", "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    # on AVX512-BF16 CPUs: training through bitsandbytes' fused inference kernel, and its `kernels` lookup
    assert "autograd kernel was not registered" not in result.stderr
    assert "kernels-community" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_match_samples"] == 32
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.7, metrics
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] / 10, metrics
    probes = metrics["knowledge_probes"]
    assert probes == 8 and metrics["knowledge_before"] >= probes - 1, metrics
    assert metrics["knowledge_after"] >= metrics["knowledge_before"] - 2, metrics["knowledge_lost"]

    before, after = (100 * metrics[f"exact_match_{when}"] for when in ("before", "after"))
    lines = result.stdout.splitlines()
    assert f"Exact match on 32 held-out prompts: {before:.1f}% before -> {after:.1f}% after finetuning" in lines
    first = lines.index("Held-out prompts, answered before and after finetuning:") + 1
    block = lines[first : first + 12]  # three held-out prompts, each with the expected, base and finetuned answers
    assert [line.split()[0] for line in block] == ["…", "expected", "base", "finetuned"] * 3
    expected = [line.removeprefix("    expected   ") for line in block[1::4]]
    assert expected == [answer["expected"] for answer in metrics["held_out_answers"]]
    assert all(text.startswith("The words in reverse order are: ") for text in expected)
