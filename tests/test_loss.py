"""The chunked loss over the vocabulary equals transformers' plain causal LM loss, and the path a run takes.

Tolerance: fp32 throughout, torch.testing's fp32 defaults (rtol 1.3e-6, atol 1e-5) unless a test says otherwise;
the two paths differ only in the order of floating-point sums (the head's matmul over fewer rows at a time).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora_cli import loss as loss_module
from qlora_cli.config import default_recipe
from qlora_cli.errors import QloraError
from qlora_cli.loss import (
    PLAIN_HEAD_MODEL_TYPES,
    HeadLoss,
    LossChoice,
    choose_loss,
    linear_cross_entropy,
    loss_for_model,
)
from qlora_cli.model_kind import IGNORE_INDEX

CHUNKED = LossChoice("chunked", "test")


@pytest.fixture
def chunks_of(monkeypatch: pytest.MonkeyPatch):
    """Make the chunked loss take `rows` labelled positions at a time, whatever the vocabulary."""

    def set_rows(rows: int, vocab: int) -> None:
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", rows * vocab)

    return set_rows


def _labels(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Random targets with a masked prompt at the start of each row and right padding at the end of one."""
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :5] = IGNORE_INDEX
    labels[0, -7:] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("num_items", [None, 61])
@pytest.mark.parametrize("rows", [1, 16, 10_000])  # one row a chunk; several with a ragged last one; one chunk
@pytest.mark.parametrize("trains_head", [False, True])
def test_loss_and_gradients_equal_transformers_causal_lm_loss(chunks_of, num_items, rows, trains_head):
    generator = torch.Generator().manual_seed(0)
    batch, length, hidden_size, vocab = 3, 20, 24, 101
    hidden = torch.randn(batch, length, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=trains_head)
    labels = _labels(batch, length, vocab, generator)
    assert (labels[:, 1:] != IGNORE_INDEX).sum() == 38  # labelled positions: chunks of 16, 16 and 6
    chunks_of(rows, vocab)
    inputs = [hidden, weight] if trains_head else [hidden]

    plain = ForCausalLMLoss(hidden @ weight.T, labels, vocab, num_items_in_batch=num_items)
    chunked = linear_cross_entropy(hidden, weight, labels, num_items)

    torch.testing.assert_close(chunked, plain)
    for ours, theirs in zip(torch.autograd.grad(chunked, inputs), torch.autograd.grad(plain, inputs)):
        torch.testing.assert_close(ours, theirs)
    with torch.no_grad():  # evaluation: the loss alone, no gradient taken
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, num_items), plain.detach())


def test_a_row_with_no_labels_is_nan_as_in_the_plain_mean():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    weight = torch.randn(11, 8)
    assert ForCausalLMLoss(hidden @ weight.T, labels, 11).isnan()
    assert linear_cross_entropy(hidden, weight, labels).isnan()
    assert linear_cross_entropy(hidden, weight, labels, num_items_in_batch=3) == 0  # counted over the whole batch


def test_the_logits_are_computed_in_the_compute_dtype_and_upcast_as_autocast_does(chunks_of):
    """On a GPU the model's head runs under bf16 autocast: the chunks' logits are bf16 too, then fp32."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 30, 32, generator=generator, requires_grad=True)
    weight = torch.randn(64, 32, generator=generator)
    labels = _labels(2, 30, 64, generator)
    chunks_of(8, 64)
    logits = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16())
    plain = ForCausalLMLoss(logits, labels, 64)
    chunked = linear_cross_entropy(hidden, weight, labels, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(chunked, plain)  # the same bf16 logits: fp32 tolerance
    (ours,), (theirs,) = torch.autograd.grad(chunked, [hidden]), torch.autograd.grad(plain, [hidden])
    scale = theirs.abs().max().item()  # bf16 gradients, rounded before the 1/count scaling instead of after it
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=2**-8 * scale)  # two bf16 roundings apart
    assert ours.dtype == torch.float32


def test_the_fused_path_hands_liger_the_labelled_positions_in_the_compute_dtype(monkeypatch):
    """liger-kernel runs only on CUDA: a stand-in with its documented signature checks what we pass it."""
    seen = {}

    def liger_fused_linear_cross_entropy(input, weight, target, **kwargs):  # noqa: A002 (liger's own names)
        seen.update(dtype=(input.dtype, weight.dtype), rows=input.shape[0], **kwargs)
        logits = torch.nn.functional.linear(input, weight).float()
        return torch.nn.functional.cross_entropy(logits, target, reduction=kwargs["reduction"]).to(input.dtype)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 12, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator)
    labels = _labels(2, 12, 40, generator)
    fused = linear_cross_entropy(hidden, weight, labels, 9, fused=True)
    labelled = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert seen == {"dtype": (torch.float32, torch.float32), "rows": labelled, "reduction": "sum"}
    torch.testing.assert_close(fused, linear_cross_entropy(hidden, weight, labels, 9))
    linear_cross_entropy(hidden, weight, labels, 9, fused=True, compute_dtype=torch.bfloat16)
    assert seen["dtype"] == (torch.bfloat16, torch.bfloat16)


# --------------------------------------------------------------------------- on models


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64)  # fmt: skip
    return AutoConfig.for_model(model_type, **sizes)


def _loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain, chunked, of_largest: float | None = None) -> None:
    """Loss to fp32 tolerance; each gradient too, or within `of_largest` times its largest element."""
    torch.testing.assert_close(chunked[0], plain[0])
    assert plain[1].keys() == chunked[1].keys() and plain[1]
    for name, grad in plain[1].items():
        tolerance = {} if of_largest is None else {"rtol": 0, "atol": of_largest * grad.abs().max().item()}
        torch.testing.assert_close(chunked[1][name], grad, msg=name, **tolerance)


def _chunked(model, head_loss: HeadLoss, batch: dict, labels: torch.Tensor, num_items=None):
    """What QloraTrainer.compute_loss does on the chunked path."""

    def compute() -> torch.Tensor:
        with head_loss.capturing():
            outputs = model(**batch, logits_to_keep=1)
            assert outputs.logits.shape[1] == 1  # the model computed one position's logits, not every position's
            return head_loss(outputs, labels, num_items)

    return compute


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_MODEL_TYPES))
def test_every_model_type_taken_as_a_plain_head_gives_its_own_loss_from_the_decoders_output(chunks_of, model_type):
    """What PLAIN_HEAD_MODEL_TYPES claims: logits = head(decoder output), nothing after (every parameter's gradient)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type)).float()
    assert model.config.model_type == model_type
    generator = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 97, (2, 16), generator=generator)}
    labels = _labels(2, 16, 97, generator)
    chunks_of(4, 97)
    plain = _loss_and_grads(model, lambda: model(**batch, labels=labels).loss)
    chunked = _loss_and_grads(model, _chunked(model, HeadLoss(model, CHUNKED), batch, labels))
    _assert_same(plain, chunked)


@pytest.fixture(scope="module", params=["builtin:tiny-llama", "builtin:smollm2-135m-instruct"])
def lora_model(request):
    """The model as `qlora train` builds it, in fp32: NF4 base, LoRA (dropout 0) on every linear layer."""
    from qlora_cli.model import add_lora, load_model

    recipe = default_recipe(request.param, ["quantization.compute_dtype=fp32", "lora.r=8", "lora.dropout=0"])
    loaded = load_model(recipe.model, recipe.quantization)
    torch.manual_seed(0)
    model = add_lora(loaded.model, recipe.lora, kind=loaded.kind)
    for name, param in model.named_parameters():  # B starts at zero: give A's gradient something to show
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


@pytest.mark.parametrize("num_items", [None, 150])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_on_the_tiny_and_the_real_model_lora_gradients_equal_the_plain_paths(chunks_of, lora_model, num_items, layout):
    """Padded rows (attention mask, -100 prompts and padding) and one packed row (position ids restarting per
    document, no mask, each document's first label masked); several chunks of 48 positions, the last ragged."""
    vocab = lora_model.config.vocab_size
    generator = torch.Generator().manual_seed(4)
    if layout == "padded":
        ids = torch.randint(3, vocab, (2, 100), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 70:] = 0
        labels = ids.clone()
        labels[:, :20] = IGNORE_INDEX
        labels[1, 70:] = IGNORE_INDEX
        batch = {"input_ids": ids, "attention_mask": mask}
    else:
        lengths = [90, 60, 50]
        ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
        batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
        labels = ids.clone()
        for start in (0, 90, 150):
            labels[0, start : start + 10] = IGNORE_INDEX  # each document's prompt, its first label included
    chunks_of(48, vocab)
    lora_model.eval()  # no dropout anywhere: both passes see the same network
    plain = _loss_and_grads(lora_model, lambda: lora_model(**batch, labels=labels, num_items_in_batch=num_items).loss)
    chunked = _loss_and_grads(lora_model, _chunked(lora_model, HeadLoss(lora_model, CHUNKED), batch, labels, num_items))
    assert all("lora_" in name for name in plain[1])
    # 30 layers of fp32 backward after sums in another order: SmolLM2's gradients differ by 2.5e-5 of their largest
    _assert_same(plain, chunked, of_largest=1e-4)


# --------------------------------------------------------------------------- which path


def _choose(overrides: list[str], model_type: str = "llama", *, device: str = "cpu", encoder_decoder: bool = False):
    recipe = default_recipe("builtin:tiny-llama", overrides)
    return choose_loss(recipe, model_type, encoder_decoder=encoder_decoder, device=device)


def test_auto_is_chunked_on_the_cpu_and_fused_on_cuda_only_with_liger(monkeypatch):
    assert _choose([]).name == "chunked" and "needs a CUDA GPU" in _choose([]).reason
    monkeypatch.setattr(loss_module, "liger_installed", lambda: False)
    without = _choose([], device="cuda:0")
    assert without.name == "chunked" and "pip install 'qlora-cli[liger]'" in without.reason
    monkeypatch.setattr(loss_module, "liger_installed", lambda: True)
    assert _choose([], device="cuda:0").name == "fused"
    assert _choose([]).name == "chunked"  # liger alone, no GPU


@pytest.mark.parametrize(
    "overrides, model_type, encoder_decoder, reason",
    [
        (["training.fsdp=true"], "llama", False, "auto: training.fsdp shards the output head"),
        (["training.deepspeed=zero2.json"], "llama", False, "auto: training.deepspeed shards the output head"),
        ([], "t5", True, "encoder-decoder"),
        ([], "gemma2", False, "'gemma2' model's head is not known to be a plain linear layer"),
        (["lora.target_modules=[q_proj,lm_head]"], "llama", False, "LoRA adapts the output head"),
        (["training.loss=plain"], "llama", False, "training.loss=plain"),
    ],
)
def test_auto_falls_back_to_plain_and_says_why(overrides, model_type, encoder_decoder, reason):
    choice = _choose(overrides, model_type, encoder_decoder=encoder_decoder)
    assert choice.name == "plain" and reason in choice.reason


@pytest.mark.parametrize("setting", ["chunked", "fused"])
@pytest.mark.parametrize(
    "overrides, model_type, encoder_decoder, message",
    [
        ([], "t5", True, "is an encoder-decoder model"),
        ([], "gemma2", False, "not known to be a plain linear layer"),
        (["lora.target_modules=[lm_head]"], "llama", False, "LoRA adapts the output head"),
    ],
)
def test_an_explicit_chunked_or_fused_loss_the_model_cannot_take_is_one_line(
    setting, overrides, model_type, encoder_decoder, message
):
    with pytest.raises(QloraError) as caught:
        _choose([f"training.loss={setting}", *overrides], model_type, encoder_decoder=encoder_decoder)
    text = str(caught.value)
    assert text.startswith(f"training.loss={setting}: ") and message in text and "\n" not in text
    assert text.endswith("use training.loss=plain (or auto)")


def test_a_seq2seq_model_is_read_from_its_config_before_loading():
    from qlora_cli.model import model_config

    recipe = default_recipe("builtin:tiny-t5")
    assert loss_for_model(recipe, model_config(recipe.model), device="cpu").name == "plain"
    explicit = default_recipe("builtin:tiny-t5", ["training.loss=chunked"])
    with pytest.raises(QloraError, match="encoder-decoder"):
        loss_for_model(explicit, model_config(explicit.model), device="cpu")


def test_a_head_that_is_not_a_bias_free_linear_layer_is_refused():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config("llama"))
    model.lm_head = torch.nn.Linear(32, 97, bias=True)
    with pytest.raises(QloraError, match="loss=chunked: the output head is a Linear with a bias, not a bias-free"):
        HeadLoss(model, CHUNKED)


@pytest.mark.parametrize(
    "cuda, liger, message",
    [
        (False, True, "needs a CUDA GPU: use training.loss=chunked (or auto) here"),
        (True, False, "needs liger-kernel: pip install 'qlora-cli[liger]'"),
    ],
)
def test_preflight_refuses_fused_without_cuda_or_liger(monkeypatch, cuda, liger, message):
    from qlora_cli.preflight import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loss_module, "liger_installed", lambda: liger)
    with pytest.raises(QloraError) as caught:
        preflight(default_recipe("builtin:tiny-llama", ["training.loss=fused"]), environ={})
    assert str(caught.value) == f"training.loss=fused: Liger's fused kernel {message}"
