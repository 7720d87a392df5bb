"""Several processes: a real 2-process DDP run (gloo, CPU), FSDP/DeepSpeed assembly, rejected combinations.

Accelerate runs FSDP only across GPUs (on the CPU it silently runs DDP), so FSDP is tested here by what it
is handed: the 4-bit storage dtype, the Trainer's FSDP settings and the shipped accelerate config.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from qlora_cli.config import QuantizationConfig, TrainingConfig, load_recipe
from qlora_cli.distributed import fsdp_config, launch_command
from qlora_cli.preflight import check_launch, deepspeed_zero_stage, preflight
from qlora_cli.errors import QloraError
from tests.conftest import REPO, python_env, run_cli
from tests.trained import run_cli_in_process

DEMO = REPO / "configs" / "demo.yaml"

# LoRA dropout draws its masks per process and length grouping groups each process's own batch, so both are
# off to make a 2 x 2 run see exactly what a 1 x 4 run sees. fp32: in bf16 (auto on CPUs with AMX) a 2-row
# and a 4-row batch round differently (the adapters differed by 3.2e-3 on a Xeon with AMX).
TINY_RUN = [
    "--config", str(DEMO), "model.name_or_path=builtin:tiny-llama", "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1",
    "data.max_train_samples=64", "data.eval_size=8", "eval.exact_match_samples=0",
    "lora.dropout=0", "training.group_by_length=false", "quantization.compute_dtype=fp32",
]  # fmt: skip
# The logged loss and gradient norm of each step, after gloo has averaged the two halves, must be the single
# run's to float rounding (they agreed to 1e-6 relative, uncapped and under the AVX2 caps of docs/cpu-kinds.md).
# The adapters agree less closely: lora_A first gets a gradient at step 2 (B starts at zero), and Adam's step
# for an element whose gradient is near its eps (1e-8) follows that gradient's rounding, which a 2-row and a
# 4-row batch, summed in another order, do not share. Measured on a Xeon with AMX: 1.7e-5 with its AVX-512
# kernels, 2.4e-4 capped at AVX2; training on the wrong batches moved every tensor by 3.0e-3 or more.
STEP_RTOL = 1e-5
ADAPTER_ATOL = 1e-3


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    ddp_dir = root / "ddp"
    ddp_dir.mkdir()  # a finished run to replace: rank 0 alone may clear it, while rank 1 waits
    (ddp_dir / "recipe.yaml").write_text("old run\n")
    (ddp_dir / "completed").write_text("yesterday\n")
    (ddp_dir / "stale.txt").write_text("from the old run\n")
    ddp = run_cli(
        "train", "--num-processes", "2", "--overwrite", *TINY_RUN, f"output_dir={ddp_dir}", "training.batch_size=2"
    )
    run_cli_in_process("train", *TINY_RUN, f"output_dir={root / 'single'}", "training.batch_size=4")
    return {"ddp": (ddp, ddp_dir), "single": root / "single"}


def test_two_process_ddp_trains_on_both_and_writes_once(ddp_and_single: dict) -> None:
    result, out = ddp_and_single["ddp"]
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert logs.count("Adapter saved to") == 1
    assert logs.count("Model builtin:tiny-llama") == 1
    assert "DDP over 2 processes: global batch 4 (2 x batch_size 2" in logs
    assert not (out / "stale.txt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    # every process saves its own RNG state into the checkpoint after its training steps
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    losses = [loss for loss, _ in _logged_steps(out)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(metrics["train_loss"])


def test_two_process_ddp_adapter_matches_one_process_with_the_same_global_batch(ddp_and_single: dict) -> None:
    from safetensors.torch import load_file

    (ddp, ddp_dir), single_dir = ddp_and_single["ddp"], ddp_and_single["single"]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # rank 1's half of every batch is counted: the tokens seen over both processes are the single run's
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert ddp_metrics["tokens"] == single_metrics["tokens"] > 0
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted(p.name for p in single_dir.iterdir())
    ddp_adapter = load_file(ddp_dir / "adapter_model.safetensors")
    single_adapter = load_file(single_dir / "adapter_model.safetensors")
    assert ddp_adapter.keys() == single_adapter.keys()
    trained = [k for k in single_adapter if "lora_B" in k]  # B starts at zero: all of it is training
    assert trained and all(single_adapter[k].abs().max() > 1e-4 for k in trained)
    worst = max((ddp_adapter[k] - single_adapter[k]).abs().max().item() for k in single_adapter)
    assert worst <= ADAPTER_ATOL
    ddp_steps, single_steps = _logged_steps(ddp_dir), _logged_steps(single_dir)
    assert len(ddp_steps) == len(single_steps) == 2
    for (ddp_loss, ddp_norm), (loss, norm) in zip(ddp_steps, single_steps):
        assert ddp_loss == pytest.approx(loss, rel=STEP_RTOL) and ddp_norm == pytest.approx(norm, rel=STEP_RTOL)


def _logged_steps(run: Path) -> list[tuple[float, float]]:
    history = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    return [(e["loss"], e["grad_norm"]) for e in history if "loss" in e]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[subprocess.CompletedProcess], Path]:
    """Two machines of one process each, as torchrun starts them, rendezvousing on the loopback.

    Node 1's process is global rank 1 but LOCAL_RANK 0: the Trainer's main process of its node.
    """
    root = tmp_path_factory.mktemp("nodes")
    out = root / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = python_env()
    env.pop("OMP_NUM_THREADS", None)  # so accelerate warns while joining, as on a real node; only rank 0 may show it
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "qlora_cli", "train", *TINY_RUN, f"output_dir={out}", "training.batch_size=2"]
        for rank in range(2)
    ]  # fmt: skip
    logs = [(root / f"node{rank}.out", root / f"node{rank}.err") for rank in range(2)]
    nodes: list[subprocess.Popen] = []
    try:
        for command, (stdout, stderr) in zip(commands, logs):
            with stdout.open("w") as out_file, stderr.open("w") as err_file:
                nodes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out_file, stderr=err_file))
        deadline = time.monotonic() + 300
        codes = [node.wait(timeout=max(deadline - time.monotonic(), 1)) for node in nodes]
    finally:
        for node in nodes:
            node.terminate()  # torchrun stops its worker (which runs in a session of its own), SIGKILL after 30 s
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    return [
        subprocess.CompletedProcess(command, code, stdout.read_text(), stderr.read_text())
        for command, code, (stdout, stderr) in zip(commands, codes, logs)
    ], out


def test_two_nodes_train_one_run_folder_like_one_process_with_the_same_global_batch(
    two_nodes: tuple, ddp_and_single: dict
) -> None:
    (node0, node1), out = two_nodes
    assert node0.returncode == node1.returncode == 0, node0.stderr[-3000:] + node1.stderr[-3000:]
    assert node0.stdout.count("Adapter saved to") == 1 and "Adapter saved to" not in node1.stdout
    assert (out / "completed").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    single_dir = ddp_and_single["single"]
    assert metrics["tokens"] == json.loads((single_dir / "metrics.json").read_text())["tokens"]
    for (node_loss, node_norm), (loss, norm) in zip(_logged_steps(out), _logged_steps(single_dir), strict=True):
        assert node_loss == pytest.approx(loss, rel=STEP_RTOL) and node_norm == pytest.approx(norm, rel=STEP_RTOL)


def test_the_second_node_is_as_quiet_as_a_replica_on_one_machine(two_nodes: tuple) -> None:
    """Rank 1 of `torchrun --nproc_per_node 2` prints nothing; node 1 printed the Trainer's log dicts and
    accelerate's OMP_NUM_THREADS warning, because it is the first process of its node."""
    (node0, node1), _ = two_nodes
    assert node0.returncode == node1.returncode == 0, node1.stderr[-3000:]
    assert "Training: 100%" in node0.stderr
    assert node1.stdout == "" and node1.stderr == ""


def test_launch_command_relaunches_this_train_through_accelerate() -> None:
    command = launch_command(DEMO, ["lora.r=8"], num_processes=3, train_flags=["--overwrite"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "3"
    assert "--multi_gpu" in command
    tail = command[command.index("qlora_cli") :]
    assert tail == ["qlora_cli", "train", "--config", str(DEMO), "--overwrite", "lora.r=8"]


def test_num_processes_under_a_launcher_is_refused(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("train", "--config", str(DEMO), "--num-processes", "2")
    assert code == 2
    assert "under a launcher" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.fsdp=true", "quantization.bits=8"], "FSDP cannot shard 8-bit"),
        (["training.fsdp=true", "quantization.quant_storage=uint8"], "must equal the compute dtype"),
        (
            ["training.fsdp=true", "quantization.quant_storage=bf16", "quantization.compute_dtype=fp32"],
            "must equal the compute dtype",
        ),
        (["training.fsdp=true", "training.deepspeed=configs/deepspeed/zero2.json"], "choose one"),
    ],
)
def test_rejected_combinations_name_the_fix(cli, overrides: list[str], message: str) -> None:
    code, _, err = cli("config", "show", "--config", str(DEMO), *overrides)
    assert code == 2
    assert message in err


def test_a_missing_deepspeed_config_is_a_preflight_error_not_a_recipe_error(cli) -> None:
    """Validating the recipe reads no files; `train` checks the file before loading anything."""
    missing = "training.deepspeed=no/such/zero.json"
    assert cli("config", "show", "--config", str(DEMO), missing)[0] == 0
    code, _, err = cli("train", "--config", str(DEMO), missing)
    assert code == 2
    assert "training.deepspeed: config file not found: no/such/zero.json" in err


@pytest.mark.parametrize(("bits", "rejected"), [(4, True), (16, False)])
def test_zero3_is_rejected_with_4bit_only(tmp_path: Path, bits: int, rejected: bool) -> None:
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    recipe = load_recipe(DEMO, [f"training.deepspeed={zero3}", f"quantization.bits={bits}"])
    if rejected:
        with pytest.raises(QloraError, match="ZeRO-3 cannot shard 4-bit"):
            preflight(recipe, {})
        return
    try:
        preflight(recipe, {})
    except QloraError as exc:  # where DeepSpeed is not installed, that is the only complaint
        assert "needs DeepSpeed" in str(exc)


def test_accepted_engine_recipes() -> None:
    both_bf16 = ["quantization.compute_dtype=bf16", "quantization.quant_storage=bf16"]
    fsdp = load_recipe(DEMO, ["training.fsdp=true", *both_bf16])
    assert fsdp.training.fsdp
    zero2 = load_recipe(DEMO, [f"training.deepspeed={REPO / 'configs/deepspeed/zero2.json'}"])
    assert deepspeed_zero_stage(zero2.training.deepspeed) == 2


def test_launch_environment_must_agree_with_the_recipe() -> None:
    plain = load_recipe(DEMO)
    with pytest.raises(QloraError, match="add training.fsdp=true"):
        check_launch(plain, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(QloraError, match="ZeRO-3 cannot shard 4-bit"):
        check_launch(plain, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    check_launch(load_recipe(DEMO, ["training.fsdp=true"]), {"ACCELERATE_USE_FSDP": "true"})
    check_launch(plain, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})


def test_deepspeed_recipe_without_deepspeed_installed_says_what_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    recipe = load_recipe(DEMO, [f"training.deepspeed={REPO / 'configs/deepspeed/zero2.json'}"])
    with pytest.raises(QloraError, match=r"pip install 'qlora-cli\[deepspeed\]'"):
        preflight(recipe, {})


def test_fsdp_stores_4bit_weights_in_the_compute_dtype() -> None:
    from qlora_cli.model import bnb_config

    quant = QuantizationConfig()
    assert bnb_config(quant, torch.bfloat16, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(quant, torch.float32, fsdp=True).bnb_4bit_quant_storage == torch.float32
    assert bnb_config(quant, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_preflight_checks_the_fsdp_storage_against_the_compute_dtype_of_this_machine() -> None:
    """`compute_dtype: auto` resolves on the machine (on a CPU: by its bf16 units), so only preflight can tell."""
    from qlora_cli.model import dtype_name, resolve_compute_dtype

    if torch.cuda.is_available():
        pytest.skip("auto resolves to bf16/fp16 on a GPU")
    auto = dtype_name(resolve_compute_dtype("auto", "cpu"))
    other = "fp32" if auto == "bf16" else "bf16"
    wrong = load_recipe(DEMO, ["training.fsdp=true", f"quantization.quant_storage={other}"])  # passes validation
    with pytest.raises(QloraError, match=rf"quant_storage={other} must equal the compute dtype \({auto}\)"):
        preflight(wrong, {})
    preflight(load_recipe(DEMO, ["training.fsdp=true", f"quantization.quant_storage={auto}"]), {})


def test_fsdp_model_keeps_the_storage_dtype_and_leaves_checkpointing_to_fsdp() -> None:
    from qlora_cli.config import ModelConfig
    from qlora_cli.model import count_parameters, load_model

    model_cfg = ModelConfig(name_or_path="builtin:tiny-llama")
    sharded = load_model(model_cfg, QuantizationConfig(compute_dtype="bf16"), device="cpu", fsdp=True).model
    packed = [p for p in sharded.parameters() if hasattr(p, "quant_state")]
    assert packed and all(p.dtype == torch.bfloat16 for p in packed)
    assert sharded.model.norm.weight.dtype == torch.bfloat16  # no fp32 upcast: FSDP wants one dtype per unit
    assert not sharded.is_gradient_checkpointing
    plain = load_model(model_cfg, QuantizationConfig(), device="cpu").model  # uint8 storage
    assert count_parameters(sharded)[1] == count_parameters(plain)[1]


def test_trainer_gets_fsdp_qlora_settings() -> None:
    from qlora_cli.trainer import training_arguments

    recipe = load_recipe(DEMO, ["training.fsdp=true", "training.gradient_checkpointing=true", "output_dir=/tmp/unused"])
    args = training_arguments(recipe, torch.float32, has_eval=False)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["cpu_ram_efficient_loading"] and plugin["activation_checkpointing"]
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not args.gradient_checkpointing
    no_ckpt = load_recipe(DEMO, ["training.fsdp=true", "training.gradient_checkpointing=false"])
    assert fsdp_config(no_ckpt.training)["activation_checkpointing"] is False


def test_shipped_accelerate_config_matches_the_recipe_switch() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / "accelerate" / "fsdp_qlora.yaml"
    loaded = load_config_from_file(str(path))  # accelerate's own reader accepts every key
    assert loaded.distributed_type == "FSDP"
    shipped = {k.removeprefix("fsdp_"): v for k, v in yaml.safe_load(path.read_text())["fsdp_config"].items()}
    assert shipped == fsdp_config(TrainingConfig(gradient_checkpointing=True))  # `auto` is decided before this


def test_shipped_deepspeed_config_is_zero2_with_trainer_values() -> None:
    path = REPO / "configs" / "deepspeed" / "zero2.json"
    config = json.loads(path.read_text())
    assert deepspeed_zero_stage(str(path)) == 2
    # "auto" lets the Trainer fill these from the recipe, so the two cannot disagree
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    assert config["zero_allow_untested_optimizer"]  # the recipe's bitsandbytes optimizer, not DeepSpeed's
