"""recipes/image_classification.py launched with the accelerate configs that ship in recipes/ (FSDP2 and DeepSpeed
ZeRO-3), for the methods that once broke under sharding.

accelerate applies FSDP and DeepSpeed only on accelerators: on CPU processes it runs plain DDP whatever the config
says (accelerate/state.py keeps `MULTI_CPU`), silently. So:

* on CPU (CI), one launch per shipped config checks that the recipe says so in a warning, reports the engine it
  really ran (`distributed_type` in all_results.json) and still trains the single-process adapter;
* on a machine with CUDA GPUs, every method under each config must really run on the engine, train the adapter of
  one process with the same global batch (atol 1e-5), save it once in a form `PeftModel.from_pretrained` loads onto
  an unsharded model, and resume from a checkpoint written under the engine bit for bit. Those tests skip on CPU.

The config files are used as shipped, with `--mixed_precision no` (they ask for bf16, which would make the
comparisons bf16 ones). `tests/reliability/test_sharded.py` runs every method under each engine through torch and
deepspeed directly on CPU; this file checks the recipe path a user takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_helpers import write_tiny_vit_and_images


ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "image_classification.py"
ENGINES = {
    "fsdp2": (ROOT / "recipes" / "accelerate_fsdp2.yaml", "FSDP"),
    "zero3": (ROOT / "recipes" / "accelerate_zero3.yaml", "DEEPSPEED"),
}
# VPT-deep (its key/value prefix once crashed under per-block FSDP), gated prompts (their clamp once edited the
# gathered copy), APT (its bank once shadowed nn.Module.apply, which deepspeed.initialize calls).
METHODS = ("vpt_deep", "gated", "apt")
BATCH = 4  # per process; 16 training images: 2 optimiser steps of 2 x 4 per epoch
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(cpu: bool) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_gpus = pytest.mark.skipif(
    _gpus() == 0,
    reason="accelerate applies FSDP and DeepSpeed on accelerators only (on CPU it runs DDP); needs a CUDA GPU",
)


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


def _run(command: list, cpu: bool) -> str:
    done = subprocess.run(command, cwd=ROOT, env=_env(cpu), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _launch(engine: str, *recipe_args, cpu: bool = False) -> str:
    """`accelerate launch --config_file <shipped config>`: 2 processes (1 on a machine with one GPU: NCCL takes one
    rank per GPU; the engine's gather, save and resume paths run all the same)."""
    config, _ = ENGINES[engine]
    processes = 2 if cpu else min(2, _gpus())
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                 str(processes), "--main_process_port", str(_free_port()), "--mixed_precision", "no", str(RECIPE),
                 *recipe_args], cpu=cpu)  # fmt: skip


def _needs_deepspeed(engine: str) -> None:
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe_sharded")
    write_tiny_vit_and_images(root, {"train": 8, "val": 2})
    return root


def _single_process(data: Path, method: str, cpu: bool, global_batch: int) -> Path:
    """The reference: one process (on the GPU where there is one), the global batch of the launch."""
    out = data / f"single-{method}-{'cpu' if cpu else 'gpu'}"
    if not out.is_dir():
        _run([sys.executable, str(RECIPE), *_recipe_args(data, out, method, global_batch)], cpu=cpu)
    return out


def _assert_same_adapter(out: Path, reference: Path) -> None:
    adapter, expected = (
        load_file(out / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert sorted(adapter) == sorted(expected) and len(adapter) > 1
    for key in expected:
        torch.testing.assert_close(adapter[key], expected[key], rtol=0, atol=TOLERANCE, msg=key)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_on_cpu_the_recipe_says_accelerate_runs_ddp_and_trains_the_same_adapter(engine, data):
    _needs_deepspeed(engine)
    out = data / f"{engine}-cpu"
    stdout = _launch(engine, *_recipe_args(data, out, "vpt_deep", BATCH), cpu=True)
    engine_name = {"fsdp2": "FSDP", "zero3": "DeepSpeed"}[engine]
    assert f"the launcher asked for {engine_name}, but accelerate runs MULTI_CPU" in stdout, stdout[-2000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["distributed_type"] == "MULTI_CPU" and results["num_processes"] == 2
    _assert_same_adapter(out, _single_process(data, "vpt_deep", cpu=True, global_batch=2 * BATCH))


@needs_gpus
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("method", METHODS)
def test_shipped_config_trains_the_single_process_adapter(engine, method, data):
    _needs_deepspeed(engine)
    processes = min(2, _gpus())
    out = data / f"{engine}-{method}"
    stdout = _launch(engine, *_recipe_args(data, out, method, BATCH))
    assert "Warning: the launcher asked for" not in stdout
    results = json.loads((out / "all_results.json").read_text())
    assert results["distributed_type"] == ENGINES[engine][1] and results["num_processes"] == processes
    saved = sorted(name for name in os.listdir(out) if name.startswith("adapter_model"))
    assert saved == ["adapter_model.safetensors"]  # one file, written once by the main process
    reference = _single_process(data, method, cpu=False, global_batch=processes * BATCH)
    _assert_same_adapter(out, reference)

    # The adapter loads onto an unsharded model and predicts as the single-process one does.
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = [_load(data, folder)(pixel_values=pixels).logits for folder in (out, reference)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)


def _load(data: Path, folder: Path):
    from peft import PeftModel
    from transformers import ViTForImageClassification
    from transformers.utils import logging

    import hf_vpt  # noqa: F401  (registers the methods with PEFT)

    logging.set_verbosity_error()  # the 7-class head of the tiny checkpoint is replaced on purpose
    base = ViTForImageClassification.from_pretrained(data / "tiny-vit", num_labels=2, ignore_mismatched_sizes=True)
    return PeftModel.from_pretrained(base, folder).eval()


@needs_gpus
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_resume_under_the_engine_is_bit_exact(engine, data):
    _needs_deepspeed(engine)
    straight, interrupted = data / f"{engine}-straight", data / f"{engine}-interrupted"
    common = ("--checkpointing_steps", "2", "--prompt_dropout", "0.1", "--random_flip")
    _launch(engine, *_recipe_args(data, straight, "vpt_deep", BATCH, *common))
    _launch(engine, *_recipe_args(data, interrupted, "vpt_deep", BATCH, *common, "--stop_after_steps", "2"))
    assert not (interrupted / "adapter_model.safetensors").exists()
    assert (interrupted / "checkpoint-2").is_dir()
    _launch(engine, *_recipe_args(data, interrupted, "vpt_deep", BATCH, *common, "--resume_from_checkpoint", "latest"))
    expected = load_file(straight / "adapter_model.safetensors")
    actual = load_file(interrupted / "adapter_model.safetensors")
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
    shutil.rmtree(interrupted)
