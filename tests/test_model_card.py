import re

import yaml

from qlora_cli.config import validate_recipe
from qlora_cli.model_card import write_model_card
from qlora_cli.model_kind import CausalLM, Seq2SeqLM

METRICS = {
    "train_loss": 1.25,
    "steps": 100,
    "runtime_s": 3725.0,
    "tokens": 51200,
    "tokens_per_s": 13.7,
    "peak_memory_bytes": 5 * 2**30,
    "peak_memory_kind": "cuda_max_allocated",
    "trainable_params": 1_000,
    "total_params": 100_000,
    "exact_match_before": 0.0,
    "exact_match_after": 0.25,
    "exact_match_samples": 8,
}


def front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def _recipe(tmp_path, **data):
    return validate_recipe(
        {"output_dir": str(tmp_path), "model": {"name_or_path": "huggyllama/llama-7b"}, "data": data}
    )


def _adapter_folder(tmp_path, task_type="CAUSAL_LM"):
    from peft import LoraConfig

    LoraConfig(task_type=task_type, target_modules=["q_proj"]).save_pretrained(tmp_path)
    return tmp_path


def test_adapter_card_front_matter_and_sections(tmp_path):
    folder = _adapter_folder(tmp_path)
    path = write_model_card(folder, _recipe(tmp_path), CausalLM(), METRICS, log_history=[{"step": 100, "eval_loss": 1.5}])

    meta, body = front_matter(path.read_text())
    assert meta["base_model"] == "huggyllama/llama-7b"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "other"
    assert meta["datasets"] == ["tatsu-lab/alpaca"]  # data came from the hub
    assert meta["pipeline_tag"] == "text-generation"
    assert {"qlora", "lora", "4-bit", "nf4"} <= set(meta["tags"])
    assert "## Training" in body and "## Results" in body and "## Recipe" in body
    assert "| Exact match (8 held-out prompts) | 0.0% before -> 25.0% after |" in body
    assert "| Last eval loss | 1.5000 (step 100) |" in body
    assert "1h 02m 05s" in body
    assert f'PeftModel.from_pretrained(base, "{folder}")' in body
    assert 'AutoModelForCausalLM.from_pretrained(\n    "huggyllama/llama-7b"' in body
    assert "bnb_4bit_use_double_quant=True" in body
    assert "### Instruction:\n<your prompt>" in body


def test_card_of_local_data_lists_no_hub_dataset(tmp_path):
    folder = _adapter_folder(tmp_path)
    meta, body = front_matter(write_model_card(folder, _recipe(tmp_path, path="my.json"), CausalLM(), None).read_text())
    assert "datasets" not in meta
    assert "alpaca from my.json" in body
    assert "## Results" not in body  # nothing measured yet


def test_full_finetune_seq2seq_card_loads_without_peft(tmp_path):
    recipe = validate_recipe(
        {"output_dir": str(tmp_path), "model": {"name_or_path": "t5-small"}, "quantization": {"bits": 16},
         "lora": {"enabled": False}}
    )  # fmt: skip
    meta, body = front_matter(write_model_card(tmp_path, recipe, Seq2SeqLM(), METRICS).read_text())
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text2text-generation"
    assert f'AutoModelForSeq2SeqLM.from_pretrained("{tmp_path}"' in body
    assert "PeftModel" not in body


def test_card_replaces_peft_template_and_hub_parser_reads_it(tmp_path):
    from huggingface_hub import ModelCard

    folder = _adapter_folder(tmp_path, task_type="SEQ_2_SEQ_LM")
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n[More Information Needed]\n")
    write_model_card(folder, _recipe(tmp_path), Seq2SeqLM(), METRICS)
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "huggyllama/llama-7b"
    assert card.data.pipeline_tag == "text2text-generation"
    assert "More Information Needed" not in card.text


def test_full_finetune_card_describes_a_whole_model(tmp_path):
    recipe = validate_recipe(
        {
            "output_dir": str(tmp_path),
            "model": {"name_or_path": "huggyllama/llama-7b"},
            "quantization": {"bits": 16},
            "lora": {"enabled": False},
        }
    )
    meta, body = front_matter(write_model_card(tmp_path, recipe, CausalLM(), METRICS).read_text())
    assert meta["library_name"] == "transformers"
    assert "full-finetune" in meta["tags"] and "lora" not in meta["tags"]
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path}"' in body
    assert "PeftModel" not in body and "frozen" not in body
