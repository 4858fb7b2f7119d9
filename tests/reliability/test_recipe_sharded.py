"""The recipes launched with the accelerate configs that ship in recipes/ (FSDP2 and DeepSpeed ZeRO-3), unchanged.

accelerate applies FSDP and DeepSpeed only on accelerators: on CPU processes it runs plain DDP whatever the config
says (accelerate/state.py keeps `MULTI_CPU`), silently. So, on CPU (CI):

* a plain `accelerate launch --config_file <shipped config>` checks that the recipe says so in a warning, reports
  the engine it really ran (`distributed_type` in all_results.json) and still trains the single-process adapter;
* every other test launches the recipe through `accelerate_engine_on_cpu.py`, which applies the engine the launcher
  asked for on the CPU processes, so that accelerate's own FSDP2 / DeepSpeed code runs over gloo: `prepare`
  (`fully_shard` on the named block class and the root; `deepspeed.initialize`), clipping, `get_state_dict`,
  `save_state` and `load_state`. The shim also makes ZeRO-3 partition every tensor and reports what `prepare` did;
  the tests check that every parameter is a DTensor (FSDP2) or partitioned (ZeRO-3) on every process.

On a machine with CUDA GPUs the same tests launch on the GPUs (NCCL; 2 ranks, or 1 with one GPU); the shim then
leaves accelerate's state alone and only partitions and reports.

Per engine and method (image classification: VPT-deep on its key/value-prefix path, VPT-shallow, gated, APT) the
launch trains the adapter of one process with the same global batch (atol 1e-5), writes it once, in a form
`PeftModel.from_pretrained` loads onto an unsharded model, and resumes from a checkpoint written under the engine
bit for bit. The other recipes (vision-language APT on ViLT, generative prompts on UVit2D, APT on the Stable
Diffusion text encoder) each draw per-process random masks or noise, so their reference is a plain DDP launch with
the same processes. Every launch clips gradients at 1.0, as the shipped ZeRO-3 config does (DeepSpeed clips inside
its engine, at its config's value). The configs ask for bf16; the comparisons pass `--mixed_precision no` so that
they are float32 ones, and separate tests run every recipe in bf16 (the adapter saved in float32). `test_sharded.py`
runs every method under each engine through torch and deepspeed directly; this file checks the recipe path a user
takes.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from shared_helpers import deepspeed_import_error, distributed_run_env, write_tiny_vit_and_images


ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ENGINE_ON_CPU = Path(__file__).with_name("accelerate_engine_on_cpu.py")
ENGINES = {
    "fsdp2": (RECIPES / "accelerate_fsdp2.yaml", "FSDP"),
    "zero3": (RECIPES / "accelerate_zero3.yaml", "DEEPSPEED"),
}
# VPT-deep (its key/value prefix once crashed under per-block FSDP), gated prompts (their clamp once edited the
# gathered copy), APT (its bank once shadowed nn.Module.apply, which deepspeed.initialize calls), VPT-shallow.
METHODS = ("vpt_deep", "vpt_shallow", "gated", "apt")
BATCH = 4  # per process; 16 training images: 2 optimiser steps of 2 x 4 per epoch
CLIP = ("--max_grad_norm", "1.0")  # the shipped ZeRO-3 config's gradient_clipping
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


ON_GPU = _gpus() > 0
PROCESSES = min(2, _gpus()) if ON_GPU else 2


def _run(command: list, cpu: bool, expect_failure: bool = False, **extra_env: str) -> str:
    env = distributed_run_env(cpu, **extra_env)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_failure:
        assert done.returncode != 0, done.stdout[-2000:]
        return done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _launch(
    engine: str, recipe: str, *recipe_args, launcher_args=(), plain_cpu=False, expect_failure=False, precision="no"
) -> str:
    """`accelerate launch --config_file <shipped config> [launcher_args] recipes/<recipe> ...` through
    `accelerate_engine_on_cpu.py` (on CPU it applies the engine; everywhere it makes ZeRO-3 partition every tensor
    and reports what `prepare` did), or with `plain_cpu` the recipe itself on CPU (accelerate's own DDP fallback)."""
    config, _ = ENGINES[engine]
    cpu = plain_cpu or not ON_GPU
    script = [str(RECIPES / recipe)] if plain_cpu else [str(ENGINE_ON_CPU), str(RECIPES / recipe)]
    processes = 2 if cpu else PROCESSES
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(processes), "--main_process_port", str(_free_port()), "--mixed_precision", precision, *launcher_args,
               *script, *recipe_args]  # fmt: skip
    report = _output_dir(recipe_args) / "engine_report"
    return _run(command, cpu=cpu, expect_failure=expect_failure, HF_VPT_ENGINE_REPORT=str(report))


def _output_dir(recipe_args) -> Path:
    return Path(recipe_args[list(recipe_args).index("--output_dir") + 1])


def _assert_engine_ran(out: Path, engine: str) -> list:
    """Every process's parameters after `prepare` are the engine's (FSDP2: DTensors; ZeRO-3: partitioned, an empty
    local tensor each); returns the reports."""
    reports = [json.loads(path.read_text()) for path in sorted((out / "engine_report").glob("rank*.json"))]
    assert len(reports) == (2 if not ON_GPU else PROCESSES), reports
    for report in reports:
        assert report["distributed_type"] == ENGINES[engine][1] and report["parameters"] > 0, report
        counted = report["dtensor"] if engine == "fsdp2" else report["zero3_partitioned"]
        assert counted == report["parameters"], report
    return reports


def _launch_ddp(recipe: str, *recipe_args) -> None:
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
          "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
          "--dynamo_backend", "no", str(RECIPES / recipe), *recipe_args], cpu=not ON_GPU)  # fmt: skip


@functools.cache
def _deepspeed_error() -> str | None:
    return deepspeed_import_error()


def _needs_deepspeed(engine: str) -> None:
    if engine == "zero3" and _deepspeed_error() is not None:
        pytest.skip(
            f"`import deepspeed` fails (it is in the `test` extra: pip install -e '.[test]'): {_deepspeed_error()}"
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe_sharded")
    write_tiny_vit_and_images(root, {"train": 8, "val": 2})
    return root


def _recipe_args(data: Path, out: Path, method: str, batch_size: int, *extra) -> list:
    return [
        "--model_name_or_path", str(data / "tiny-vit"),
        "--train_dir", str(data / "train"),
        "--validation_dir", str(data / "val"),
        "--method", method,
        "--num_prompt_tokens", "3",
        "--num_train_epochs", "2",
        "--learning_rate", "0.05",
        "--per_device_train_batch_size", str(batch_size),
        "--output_dir", str(out),
        "--disable_tqdm",
        *extra,
    ]  # fmt: skip


def _single_process(data: Path, method: str, cpu: bool = not ON_GPU) -> Path:
    """The reference: one process (on the GPU where there is one, unless `cpu`), the global batch of the launch,
    gradients clipped as in the launches."""
    out = data / f"single-{method}-{'cpu' if cpu else 'gpu'}"
    if not out.is_dir():
        args = _recipe_args(data, out, method, (2 if cpu else PROCESSES) * BATCH, *CLIP)
        _run([sys.executable, str(RECIPES / "image_classification.py"), *args], cpu=cpu)
    return out


def _adapter_tensors(folder: Path) -> dict:
    return {key: value for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")
            for key, value in load_file(folder / name).items()}  # fmt: skip


def _assert_same_adapter(out: Path, reference: Path, atol: float = TOLERANCE) -> None:
    adapter, expected = _adapter_tensors(out), _adapter_tensors(reference)
    assert sorted(adapter) == sorted(expected) and len(adapter) > 1
    for key in expected:
        assert adapter[key].dtype == torch.float32, key
        torch.testing.assert_close(adapter[key], expected[key], rtol=0, atol=atol, msg=key)


def _load(data: Path, folder: Path):
    from peft import PeftModel
    from transformers import ViTForImageClassification
    from transformers.utils import logging

    import hf_vpt  # noqa: F401  (registers the methods with PEFT)

    logging.set_verbosity_error()  # the 7-class head of the tiny checkpoint is replaced on purpose
    base = ViTForImageClassification.from_pretrained(data / "tiny-vit", num_labels=2, ignore_mismatched_sizes=True)
    return PeftModel.from_pretrained(base, folder).eval()


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_on_cpu_the_recipe_says_accelerate_runs_ddp_and_trains_the_same_adapter(engine, data):
    _needs_deepspeed(engine)
    out = data / f"{engine}-plain-cpu"
    args = _recipe_args(data, out, "vpt_deep", BATCH, *CLIP)
    stdout = _launch(engine, "image_classification.py", *args, plain_cpu=True)
    engine_name = {"fsdp2": "FSDP", "zero3": "DeepSpeed"}[engine]
    assert f"the launcher asked for {engine_name}, but accelerate runs MULTI_CPU" in stdout, stdout[-2000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["distributed_type"] == "MULTI_CPU" and results["num_processes"] == 2
    _assert_same_adapter(out, _single_process(data, "vpt_deep", cpu=True))


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("method", METHODS)
def test_shipped_config_trains_the_single_process_adapter(engine, method, data):
    _needs_deepspeed(engine)
    out = data / f"{engine}-{method}"
    stdout = _launch(engine, "image_classification.py", *_recipe_args(data, out, method, BATCH, *CLIP))
    assert "Warning: the launcher asked for" not in stdout
    _assert_engine_ran(out, engine)
    results = json.loads((out / "all_results.json").read_text())
    assert results["distributed_type"] == ENGINES[engine][1] and results["num_processes"] == PROCESSES
    saved = sorted(name for name in os.listdir(out) if name.startswith("adapter_model"))
    assert saved == ["adapter_model.safetensors"]  # one file, written once by the main process
    reference = _single_process(data, method)
    _assert_same_adapter(out, reference)

    # The adapter loads onto an unsharded model and predicts as the single-process one does.
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [_load(data, folder)(pixel_values=pixels).logits for folder in (out, reference)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bf16_as_the_shipped_configs_ask_saves_the_float32_adapter(engine, data):
    """The configs as shipped ask for bf16. The adapter is saved in float32 from the trained float32 weights (FSDP2
    keeps them; DeepSpeed keeps them as its optimiser's masters beside 16-bit copies, which accelerate's state dict
    holds), close to float32 training, and predicts as that adapter does within bf16's precision."""
    _needs_deepspeed(engine)
    out = data / f"{engine}-bf16"
    _launch(engine, "image_classification.py", *_recipe_args(data, out, "vpt_deep", BATCH, *CLIP), precision="bf16")
    reports = _assert_engine_ran(out, engine)
    # what the engine trains: FSDP2 float32 shards (bf16 only in compute), DeepSpeed bf16 copies of float32 masters
    expected = "torch.float32" if engine == "fsdp2" else "torch.bfloat16"
    assert all(report["trainable_dtypes"] == [expected] for report in reports), reports
    reference_folder = _single_process(data, "vpt_deep")
    adapter, reference = _adapter_tensors(out), _adapter_tensors(reference_folder)
    assert sorted(adapter) == sorted(reference)
    for key, value in adapter.items():
        assert value.dtype == torch.float32, key
        # float32 weights, not 16-bit copies cast up: some values are not representable in bf16
        assert (value != value.bfloat16().float()).any(), key
        # measured on CPU: at most 3.6e-3; AdamW's normalised steps (lr 0.05) leave room for sign flips
        torch.testing.assert_close(value, reference[key], rtol=0, atol=5e-2, msg=key)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [_load(data, folder)(pixel_values=pixels).logits for folder in (out, reference_folder)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=5e-2)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_resume_under_the_engine_is_bit_exact(engine, data):
    """A run stopped at step 2 (its checkpoint written by accelerate's FSDP / DeepSpeed `save_state`) and resumed
    from 'latest' ends with the adapter of an uninterrupted run under the same engine, bit for bit."""
    _needs_deepspeed(engine)
    straight, interrupted = data / f"{engine}-straight", data / f"{engine}-interrupted"
    common = ("--checkpointing_steps", "2", "--prompt_dropout", "0.1", "--random_flip", *CLIP)
    recipe = "image_classification.py"
    _launch(engine, recipe, *_recipe_args(data, straight, "vpt_deep", BATCH, *common))
    _launch(engine, recipe, *_recipe_args(data, interrupted, "vpt_deep", BATCH, *common, "--stop_after_steps", "2"))
    assert not (interrupted / "adapter_model.safetensors").exists()
    assert (interrupted / "checkpoint-2").is_dir()
    _launch(engine, recipe, *_recipe_args(data, interrupted, "vpt_deep", BATCH, *common, "--resume_from_checkpoint",
                                          "latest"))  # fmt: skip
    expected, actual = _adapter_tensors(straight), _adapter_tensors(interrupted)
    assert sorted(expected) == sorted(actual) and expected
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key


# recipe -> (the transformers / diffusers block class to auto-wrap under FSDP, the recipe options)
OTHER_RECIPES = {
    "vision_language.py": ("ViltLayer", ["--task", "vqa", "--method", "apt", "--max_train_steps", "3"]),
    "generative_transfer.py": ("BasicTransformerBlock", ["--tiny", "--model", "uvit", "--max_train_steps", "3"]),
    "text_to_image.py": ("CLIPEncoderLayer", ["--tiny", "--method", "apt", "--max_train_steps", "3",
                                              "--eval_steps", "100"]),
}  # fmt: skip


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("recipe", sorted(OTHER_RECIPES))
def test_every_recipe_takes_the_shipped_config(engine, recipe, tmp_path):
    """The shipped config with the block class of the recipe's model named on the command line (the one change an
    FSDP user makes per model) trains the adapter of a plain DDP launch, saved once, in float32."""
    _needs_deepspeed(engine)
    block, options = OTHER_RECIPES[recipe]
    common = [*options, "--per_device_train_batch_size", "2", "--disable_tqdm", "--report_to", "none", *CLIP]
    sharded, ddp = tmp_path / engine, tmp_path / "ddp"
    launcher_args = ["--fsdp_transformer_layer_cls_to_wrap", block] if engine == "fsdp2" else []
    stdout = _launch(engine, recipe, *common, "--output_dir", str(sharded), launcher_args=launcher_args)
    assert "Warning: the launcher asked for" not in stdout
    _assert_engine_ran(sharded, engine)
    _launch_ddp(recipe, *common, "--output_dir", str(ddp))
    saved = sorted(name for name in os.listdir(sharded / "adapter") if name.endswith(".safetensors"))
    assert saved == ["adapter_model.safetensors"]
    _assert_same_adapter(sharded / "adapter", ddp / "adapter")


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("recipe", sorted(OTHER_RECIPES))
def test_every_recipe_trains_in_bf16_under_the_shipped_config(engine, recipe, tmp_path):
    """The configs ask for bf16: DeepSpeed then casts the model itself, without autocast, so whatever a recipe feeds
    it besides the model's own outputs (UVit2D's conditioning, the SD text encoder's states into the frozen UNet,
    sampling) must follow the model's dtype. The run completes and saves a finite float32 adapter."""
    _needs_deepspeed(engine)
    block, options = OTHER_RECIPES[recipe]
    out = tmp_path / engine
    args = [*options, "--per_device_train_batch_size", "2", "--disable_tqdm", "--report_to", "none", *CLIP]
    launcher_args = ["--fsdp_transformer_layer_cls_to_wrap", block] if engine == "fsdp2" else []
    _launch(engine, recipe, *args, "--output_dir", str(out), launcher_args=launcher_args, precision="bf16")
    _assert_engine_ran(out, engine)
    adapter = _adapter_tensors(out / "adapter")
    assert adapter and all(value.dtype == torch.float32 and value.isfinite().all() for value in adapter.values())


def test_a_recipe_option_that_deepspeed_would_override_is_an_error(data, tmp_path):
    """DeepSpeed clips and accumulates with its config's numbers and ignores the recipe's: a contradiction stops the
    launch before anything loads, naming both values."""
    _needs_deepspeed("zero3")
    for option, value, key in [
        ("--max_grad_norm", "0.5", "gradient_clipping: 1.0"),
        ("--gradient_accumulation_steps", "2", "gradient_accumulation_steps: 1"),
    ]:
        args = _recipe_args(data, tmp_path / "out", "vpt_deep", BATCH, option, value)
        output = _launch("zero3", "image_classification.py", *args, expect_failure=True)
        assert f"{option} {value} contradicts the DeepSpeed config ({key})" in output, output[-2000:]
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_zero3_init_flag_on_loads_the_base_whole_and_says_so(data):
    """accelerate turns zero3_init_flag on for ZeRO-3 when the launcher does not say; the recipe still loads the base
    whole (transformers' partitioned loading refuses the new head), says so, and trains the same adapter."""
    _needs_deepspeed("zero3")
    out = data / "zero3-init-flag"
    args = _recipe_args(data, out, "vpt_deep", BATCH, *CLIP)
    stdout = _launch("zero3", "image_classification.py", *args, launcher_args=["--zero3_init_flag", "true"])
    assert "zero3_init_flag is on, but the recipe loads the frozen base model whole" in stdout, stdout[-2000:]
    _assert_same_adapter(out, _single_process(data, "vpt_deep"))


class _FakeAccelerator:
    """What `training.check_deepspeed_settings` and `training.loading_whole_model` read of an `Accelerator` running
    DeepSpeed: its distributed type and plugin (a real `DeepSpeedPlugin`, built in this process)."""

    def __init__(self, plugin):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.state = SimpleNamespace(deepspeed_plugin=plugin)
        self.printed = []

    def print(self, text):
        self.printed.append(text)


def _training_module():
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    import training

    return training


def _plugin(**kwargs):
    _needs_deepspeed("zero3")
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(**kwargs)


def test_auto_values_of_the_deepspeed_config_take_the_recipe_options():
    training = _training_module()
    plugin = _plugin(zero_stage=2)  # accelerate's plugin from `--use_deepspeed`: clipping and accumulation "auto"
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    args = SimpleNamespace(gradient_accumulation_steps=3, max_grad_norm=None)
    training.check_deepspeed_settings(_FakeAccelerator(plugin), args)
    # no --max_grad_norm: no clipping, as under DDP and FSDP (accelerate would fill in 1.0)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 3
    plugin = _plugin(zero_stage=2)
    training.check_deepspeed_settings(_FakeAccelerator(plugin), SimpleNamespace(gradient_accumulation_steps=1,
                                                                                max_grad_norm=0.5))  # fmt: skip
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    # a number in the config stays when the recipe option agrees or is not given
    plugin = _plugin(zero_stage=2, gradient_clipping=1.0, gradient_accumulation_steps=1)
    training.check_deepspeed_settings(_FakeAccelerator(plugin), SimpleNamespace(gradient_accumulation_steps=1,
                                                                                max_grad_norm=None))  # fmt: skip
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


@pytest.fixture
def deepspeed_registration():
    """Leaves transformers' global DeepSpeed registration unset after the test, as the other tests expect it."""
    from transformers.integrations import unset_hf_deepspeed_config

    yield
    unset_hf_deepspeed_config()


def test_loading_whole_model_lifts_the_zero3_registration_and_puts_it_back(deepspeed_registration):
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    training = _training_module()
    plugin = _plugin(zero_stage=3)
    plugin.set_deepspeed_weakref()  # what accelerate does when it selects the plugin
    accelerator = _FakeAccelerator(plugin)
    assert is_deepspeed_zero3_enabled()
    with training.loading_whole_model(accelerator):
        assert not is_deepspeed_zero3_enabled()  # from_pretrained builds the model whole here
    assert is_deepspeed_zero3_enabled()
    with pytest.raises(RuntimeError, match="load failed"), training.loading_whole_model(accelerator):
        raise RuntimeError("load failed")
    assert is_deepspeed_zero3_enabled()
    # ZeRO-2 partitions nothing at load: its registration stays
    plugin = _plugin(zero_stage=2)
    plugin.set_deepspeed_weakref()
    with training.loading_whole_model(_FakeAccelerator(plugin)):
        assert deepspeed_config()["zero_optimization"]["stage"] == 2
