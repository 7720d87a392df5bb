"""Packing: rows filled best-fit decreasing, documents that never see each other, and the same gradients as unpacked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qlora_cli.config import DataConfig, ModelConfig, QuantizationConfig
from qlora_cli.data.packing import PACKABLE_MODEL_TYPES, best_fit_decreasing, flash_lengths, pack, packing_problem
from qlora_cli.data.tokenize import PaddingCollator
from qlora_cli.errors import QloraError
from qlora_cli.model_kind import IGNORE_INDEX
from tests.conftest import REPO

TOLERANCE = 1e-4  # fp32 logits of a document inside a packed row against the document alone


# --------------------------------------------------------------------------- rows


def test_best_fit_decreasing_puts_each_example_in_the_fullest_row_it_fits():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every example once
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    fewest = -(-sum(lengths) // 512)
    assert len(bins) <= 11 / 9 * fewest + 1
    assert len(bins) < 0.6 * len(lengths)  # first-fit in input order would not matter: any packing at all


def examples(lengths: list[int], source: int = 2):
    import datasets

    rows = []
    for n, length in enumerate(lengths):
        ids = [100 * (n + 1) + k for k in range(length)]
        labels = [IGNORE_INDEX] * source + ids[source:]
        rows.append({"input_ids": ids, "labels": labels, "length": length, "truncated": n == 0})
    return datasets.Dataset.from_list(rows)


def test_a_packed_row_restarts_positions_and_masks_each_documents_first_label():
    packed = pack(examples([3, 5, 4]), DataConfig(max_packed_len=8, source_max_len=4, target_max_len=4))
    assert (len(packed.rows), packed.examples, packed.tokens) == (2, 3, 12)
    first, second = packed.rows[0], packed.rows[1]
    # the 5 first, then the 4 (no room beside it), then the 3 into the fullest row it fits: the 5's, exactly
    assert first["input_ids"] == [100, 101, 102, 200, 201, 202, 203, 204]  # dataset order within a row
    assert first["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert first["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, IGNORE_INDEX, IGNORE_INDEX, 202, 203, 204]
    assert second["input_ids"] == [300, 301, 302, 303] and second["position_ids"] == [0, 1, 2, 3]
    # with the source trained too, the first label of each document is masked all the same
    trained_source = pack(examples([3, 4], source=0), DataConfig(max_packed_len=8, source_max_len=4, target_max_len=4))
    assert trained_source.rows[0]["labels"] == [IGNORE_INDEX, 101, 102, IGNORE_INDEX, 201, 202, 203]
    assert (first["examples"], first["truncated"], first["length"]) == (2, 1, 8)
    assert packed.fill == pytest.approx(12 / 16)
    assert "3 examples packed into 2 rows of up to 8 tokens: 1.5 examples and 6 tokens a row" in packed.describe()


def test_an_example_longer_than_a_row_is_refused_with_the_count():
    with pytest.raises(QloraError, match=r"max_packed_len=4 is shorter than 2 of 3 training examples \(the longest has 6"):
        pack(examples([3, 5, 6]), DataConfig(max_packed_len=4))


def test_the_collator_passes_position_ids_and_no_mask_and_flash_gets_the_same_lengths_as_transformers():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7], "labels": [-100, 7], "position_ids": [0, 1]},
    ]
    batch = PaddingCollator(0, flash_attention=True)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]  # padding: one-token documents
    assert batch["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 5, 7, 8, 9, 10]
    assert batch["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) == int(max_k) == 3
    assert set(PaddingCollator(0)(rows)) == {"input_ids", "position_ids", "labels"}
    assert flash_lengths(torch.tensor([[0, 1, 2, 3]]))["cu_seq_lens_q"].tolist() == [0, 4]


# --------------------------------------------------------------------------- isolation


def tiny_model(model_type: str, attn: str):
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.config.use_cache = False  # as qlora_cli.model.load_model leaves a model it trains
    return model


def packed_batch(documents: list[list[int]]) -> dict[str, torch.Tensor]:
    """The documents in one row, and a second, shorter row, padded: as the collator makes a batch of two rows."""
    row = {
        "input_ids": [t for d in documents for t in d],
        "labels": [t for d in documents for t in d],
        "position_ids": [p for d in documents for p in range(len(d))],
    }
    short = documents[0]
    return PaddingCollator(0)([row, {"input_ids": short, "labels": short, "position_ids": list(range(len(short)))}])


def worst_document(model, documents: list[list[int]], **extra) -> float:
    """The largest logit difference between each document inside the packed row and the document run alone."""
    batch = packed_batch(documents)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
        worst, start = 0.0, 0
        for document in documents:
            alone = model(input_ids=torch.tensor([document])).logits[0]
            worst = max(worst, (logits[0, start : start + len(document)] - alone).abs().max().item())
            start += len(document)
        short = len(documents[0])  # the padded second row holds the first document alone
        alone = model(input_ids=torch.tensor([documents[0]])).logits[0]
        worst = max(worst, (logits[1, :short] - alone).abs().max().item())
    return worst


def assert_isolated(model, documents: list[list[int]]) -> None:
    assert worst_document(model, documents) < TOLERANCE
    ones = torch.ones(2, sum(map(len, documents)), dtype=torch.long)
    assert worst_document(model, documents, attention_mask=ones) > 100 * TOLERANCE  # a mask overrides positions
    assert worst_document(model, documents, use_cache=True) > 100 * TOLERANCE  # a cache turns detection off


@pytest.mark.parametrize("model_type", PACKABLE_MODEL_TYPES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_document_sees_only_itself(model_type: str, attn: str):
    assert_isolated(tiny_model(model_type, attn), [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_document_of_smollm2_sees_only_itself(attn: str):
    from qlora_cli.model import load_model

    cfg = ModelConfig(name_or_path="builtin:smollm2-135m-instruct", attn_implementation=attn)
    loaded = load_model(cfg, QuantizationConfig(bits=16, compute_dtype="fp32"), device="cpu")
    assert loaded.model.config.use_cache is False
    tokenizer = loaded.tokenizer
    texts = ["The capital of France is Paris.", "Reverse the words: apple river stone", "2 + 2 = 4, and 3 + 3 = 6."]
    documents = [tokenizer(text)["input_ids"] for text in texts]
    assert_isolated(loaded.model.eval(), documents)


def test_models_and_attention_that_would_not_isolate_documents_are_refused():
    import transformers

    assert packing_problem(transformers.LlamaConfig(), None) is None
    assert packing_problem(transformers.LlamaConfig(), "flash_attention_2") is None
    assert "encoder-decoder" in packing_problem(transformers.T5Config(), None)
    assert "not proven to keep packed documents apart for model type 'gpt2'" in packing_problem(
        transformers.GPT2Config(), None
    )
    assert "model.attn_implementation='flex_attention'" in packing_problem(transformers.LlamaConfig(), "flex_attention")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Alpaca records whose answers run from 1 to 24 words: a per-row or per-example mean would weigh them apart."""
    rng = random.Random(3)
    words = "apple river stone cloud tiger green music paper light house ocean bread".split()
    records = [
        {"instruction": "Say some words.", "input": "", "output": " ".join(rng.choices(words, k=k))}
        for k in (1, 24, 3, 17, 2, 9, 12, 5)
    ]
    path = tmp_path_factory.mktemp("varied") / "varied.json"
    path.write_text(json.dumps(records))
    return path


def one_step(cli, out: Path, data: Path, *overrides: str, processes: int = 1) -> str:
    """One SGD step at learning rate 1 without clipping: the adapter moves by exactly minus its gradient. Returns
    what `qlora train` printed on stderr (run in this process; with processes > 1 it launches the workers)."""
    launch = ["--num-processes", str(processes)] if processes > 1 else []
    code, _, err = cli(
        "train", *launch, "--config", str(REPO / "configs/demo.yaml"), f"output_dir={out}", f"data.path={data}",
        "model.name_or_path=builtin:tiny-llama", "quantization.compute_dtype=fp32", "lora.dropout=0", "lora.r=8",
        "training.optim=sgd", "training.learning_rate=1.0", "training.warmup_ratio=0", "training.max_grad_norm=1e9",
        "training.max_steps=1", "training.save_steps=1", "training.logging_steps=1", "training.group_by_length=false",
        "data.eval_size=0", "data.source_max_len=64", "data.target_max_len=64", "eval.exact_match_samples=0",
        "eval.loss_before_after=false", "eval.knowledge_probes=[]", "data.train_on_source=true", *overrides,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    return err


def rows_for(data: Path, max_packed_len: int) -> int:
    from qlora_cli.data import prepare_data
    from qlora_cli.model import load_tokenizer
    from qlora_cli.model_kind import CausalLM

    cfg = DataConfig(path=str(data), eval_size=0, source_max_len=64, target_max_len=64, train_on_source=True,
                     packing=True, max_packed_len=max_packed_len)  # fmt: skip
    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    try:
        return len(prepare_data(cfg, tokenizer, kind=CausalLM(), seed=42).packed.rows)
    except QloraError:  # shorter than the longest example
        return 0


def test_a_packed_step_trains_the_adapter_an_unpacked_step_trains(cli, varied: Path, tmp_path: Path):
    """All 8 documents in one optimizer step: unpacked in one batch; packed into 4 rows, 2 a batch with 2 accumulated;
    and the same rows over two processes of one row each, accumulating 2. The loss is the token mean over the step.
    The source is trained too, so a document's first token would be a label if packing did not mask it."""
    from safetensors.torch import load_file

    max_len = next(n for n in range(64, 256, 4) if rows_for(varied, n) == 4)
    packing = ["data.packing=true", f"data.max_packed_len={max_len}"]
    one_step(cli, tmp_path / "unpacked", varied, "training.batch_size=8", "training.gradient_accumulation_steps=1")
    err = one_step(cli, tmp_path / "packed", varied, *packing, "training.batch_size=2",
                   "training.gradient_accumulation_steps=2")  # fmt: skip
    assert f"8 examples packed into 4 rows of up to {max_len} tokens" in err
    assert "a step of 4 rows holds 8 examples" in err
    recorded = json.loads((tmp_path / "packed" / "metrics.json").read_text())["packing"]
    assert (recorded["examples"], recorded["rows"], recorded["max_len"]) == (8, 4, max_len)
    tokens = {run: json.loads((tmp_path / run / "metrics.json").read_text())["tokens"] for run in ("unpacked", "packed")}
    assert tokens["packed"] == tokens["unpacked"] == recorded["tokens"]  # real tokens, padding left out
    one_step(cli, tmp_path / "ddp", varied, *packing, "training.batch_size=1", "training.gradient_accumulation_steps=2",
             processes=2)  # fmt: skip

    adapters = {run: load_file(tmp_path / run / "adapter_model.safetensors") for run in ("unpacked", "packed", "ddp")}
    reference = adapters["unpacked"]
    moved = [name for name in reference if "lora_B" in name]  # B starts at zero: it moved by minus its gradient
    assert moved and all(reference[name].abs().max() > 1e-3 for name in moved)
    for run in ("packed", "ddp"):
        worst = max((adapters[run][name] - reference[name]).abs().max().item() for name in reference)
        assert worst < 1e-5, (run, worst)


def test_packing_is_refused_before_loading_where_it_cannot_run(cli, varied: Path, tmp_path: Path):
    common = ["train", "-c", str(REPO / "configs/demo.yaml"), f"output_dir={tmp_path / 'run'}", "data.packing=true"]
    code, _, err = cli(*common, "model.name_or_path=builtin:tiny-t5")
    assert code == 2 and "data.packing: t5 is an encoder-decoder model" in err
    code, _, err = cli(*common, "model.name_or_path=builtin:tiny-llama", "model.attn_implementation=flex_attention")
    assert code == 2 and "would let packed documents attend to each other" in err
    code, _, err = cli(*common, "model.name_or_path=builtin:tiny-llama", f"data.path={varied}", "data.eval_size=0",
                       "data.max_packed_len=16")  # fmt: skip
    assert code == 2 and "data.max_packed_len=16 is shorter than" in err and "raise data.max_packed_len to" in err
    code, _, err = cli(*common, "model.name_or_path=builtin:tiny-llama", f"data.path={varied}", "data.eval_size=0",
                       "training.batch_size=8")  # fmt: skip
    assert code == 2 and "fill 1 row of data.max_packed_len=2048, fewer than the training.batch_size=8" in err


def test_the_tokens_counted_are_the_real_ones_even_where_eos_is_the_pad_token():
    from qlora_cli.data.packing import real_tokens

    rows = [  # pad and EOS are both 2: the documents' EOS count, the padding does not
        {"input_ids": [7, 8, 2, 9, 2], "labels": [-100, 8, 2, -100, 2], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [5, 2], "labels": [-100, 2], "position_ids": [0, 1]},
    ]
    batch = PaddingCollator(2)(rows)
    assert batch["input_ids"][1].tolist() == [5, 2, 2, 2, 2]
    assert real_tokens(batch, pad_token_id=2) == 7
