"""recipes/image_classification.py under `accelerate launch` with 2 CPU processes (gloo): data-parallel training is
what it should be.

2 processes x batch b train the same adapter as 1 process x batch 2b, up to float32 rounding. Every process starts
from the same seed (prompt and head initialisation), and accelerate shards the one seeded shuffle so that process i
takes batches i, i + 2, ... of size b: optimiser step k sees images [2kb, 2kb + 2b) of the same permutation that the
single process cuts into batches of 2b; DDP averages the two per-process mean gradients, which is the mean gradient
of the 2b images, so only the order of the float32 sums differs.

Tolerance: atol 1e-5. A run with the wrong global batch (1 process x b) differs from the reference by far more than
100x that (checked below), so the comparison pins down the data order and batch composition, not just "something
was trained".
"""

import os
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
BATCH = 5  # per process; 20 training images = 2 optimiser steps of 2 x 5 per epoch
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="1",  # gloo on CPU even where a GPU is visible
        MASTER_ADDR="127.0.0.1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _recipe_args(data: Path, out: Path, batch_size: int) -> list:
    return [
        "--model_name_or_path", str(data / "tiny-vit"),
        "--train_dir", str(data / "train"),
        "--validation_dir", str(data / "val"),
        "--method", "vpt_deep",
        "--num_prompt_tokens", "3",
        "--num_train_epochs", "3",
        "--learning_rate", "1.0",  # 6 steps must move the prompts well past the tolerance
        "--per_device_train_batch_size", str(batch_size),
        "--output_dir", str(out),
        "--disable_tqdm",
    ]  # fmt: skip


def _run(command: list) -> None:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    write_tiny_vit_and_images(root, {"train": 10, "val": 2})
    single, half, multi = root / "single", root / "half", root / "multi"
    _run([sys.executable, str(RECIPE), *_recipe_args(root, single, 2 * BATCH)])
    _run([sys.executable, str(RECIPE), *_recipe_args(root, half, BATCH)])
    _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
         "--dynamo_backend", "no", str(RECIPE), *_recipe_args(root, multi, BATCH)]
    )  # fmt: skip
    return {name: load_file(path / "adapter_model.safetensors") for name, path in
            (("single", single), ("half", half), ("multi", multi))}  # fmt: skip


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    single, half, multi = runs["single"], runs["half"], runs["multi"]
    assert sorted(single) == sorted(multi) and any("prompt" in key for key in single)
    for key in single:
        torch.testing.assert_close(multi[key], single[key], rtol=0, atol=TOLERANCE, msg=key)
    # Half the global batch trains something else: the tolerance separates right from wrong.
    assert max((half[key] - single[key]).abs().max().item() for key in single) > 100 * TOLERANCE
