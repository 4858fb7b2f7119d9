"""The image-classification recipe under `accelerate launch` with 2 CPU processes (gloo), on the embedded digits.

Checks that data-parallel training is what it should be:

* both processes end with bit-identical prompts and head (DDP all-reduces the gradients, so every process takes
  the same optimiser step);
* 2 processes x batch b train the same adapter as 1 process x batch 2b, up to float32 rounding. The recipe seeds
  every process alike (prompt and head initialisation), and accelerate shards the one seeded shuffle so that
  process i takes batches i, i + 2, ... of size b: optimiser step k sees images [2kb, 2kb + 2b) of the same
  permutation that the single process cuts into batches of 2b. The mean of the two per-process mean gradients is
  the mean gradient of the 2b images; only the order of the float32 sums differs.

Tolerance: the two runs differ by about 1.5e-7 (one or two float32 ulps of values near 0.3) after 6 SGD steps
with momentum; we allow atol 1e-5. Training moves the prompts by more than 100x that, and a run with the wrong
global batch (1 process x b, measured once) differs from the reference by more than 1e-2, so the check pins down
the data order and batch composition, not just "something was trained".

The recipe writes each process's tensors with `--save_rank_tensors` to
`<output_dir>/rank<N>/<method>-seed<S>[-init].safetensors` (after and before training).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
METHOD, SEED = "vpt_deep", 0
BATCH = 5  # per process; 4 shots x 5 classes = 20 training images = 2 optimiser steps of 2 x 5 per epoch
TINY = [
    "--backbones", "supervised",
    "--methods", METHOD,
    "--seed", str(SEED),
    "--num_seeds", "1",
    "--hidden_size", "16",
    "--num_hidden_layers", "2",
    "--intermediate_size", "32",
    "--pretrain_epochs", "1",
    "--shots", "4",
    "--epochs", "3",
    "--warmup_epochs", "1",
    "--lr_vpt_deep", "1.0",  # explicit: 3 epochs of a few steps must move the prompts well past the tolerance
    "--prompt_dropout", "0",  # no randomness inside training: the ViT's own dropout rates default to 0 too
    "--no-augment",
    "--no-progress",
    "--save_rank_tensors",
]  # fmt: skip
PROMPT_KEY = "base_model.visual_prompt_bank.default.embeddings.vision"
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


def _run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _single(out: Path, cache: Path, batch_size: int) -> None:
    _run(
        [sys.executable, str(RECIPE), *TINY, "--batch_size", str(batch_size), "--output_dir", str(out),
         "--cache_dir", str(cache)]
    )  # fmt: skip


def _two_processes(out: Path, cache: Path, batch_size: int) -> None:
    _run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            str(RECIPE), *TINY, "--batch_size", str(batch_size), "--output_dir", str(out), "--cache_dir", str(cache),
        ]
    )  # fmt: skip


def _tensors(out: Path, rank: int, stage: str = "") -> dict[str, torch.Tensor]:
    return load_file(out / f"rank{rank}" / f"{METHOD}-seed{SEED}{stage}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (it also pretrains and caches the tiny backbone, which the 2-process run reuses,
    so that both start from the same frozen ViT) and the 2-process run."""
    root = tmp_path_factory.mktemp("multiprocess")
    cache = root / "cache"
    paths = {"single": root / "single", "multi": root / "multi"}
    _single(paths["single"], cache, 2 * BATCH)
    _two_processes(paths["multi"], cache, BATCH)
    return paths


def test_both_processes_hold_identical_prompts(runs):
    multi = runs["multi"]
    results = json.loads((multi / "results.json").read_text())
    assert results["num_processes"] == 2 and results["backbone"]["reused"]
    assert not (multi / "rank2").exists()
    for stage in ("-init", ""):  # the processes start alike (same seed) and stay alike (all-reduced gradients)
        rank0, rank1 = _tensors(multi, 0, stage), _tensors(multi, 1, stage)
        assert PROMPT_KEY in rank0 and rank0[PROMPT_KEY].shape == (2, 5, 16)  # [layers, prompt tokens, hidden]
        assert sorted(rank0) == sorted(rank1)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (stage, key)
    # The saved adapter is the main process's prompts.
    saved = load_file(multi / METHOD / "adapter_model.safetensors")
    assert torch.equal(saved[PROMPT_KEY.replace(".default", "")], rank0[PROMPT_KEY])


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    assert json.loads((runs["single"] / "results.json").read_text())["num_processes"] == 1
    single, multi = _tensors(runs["single"], 0), _tensors(runs["multi"], 0)
    for key, value in _tensors(runs["single"], 0, "-init").items():  # same seed, same initialisation
        assert torch.equal(_tensors(runs["multi"], 0, "-init")[key], value), key
        # training moves every tensor far beyond the tolerance, so the comparison below is not vacuous
        assert (single[key] - value).abs().max() > 100 * TOLERANCE, key
    assert sorted(single) == sorted(multi)
    for key in single:
        torch.testing.assert_close(multi[key], single[key], rtol=0, atol=TOLERANCE, msg=key)
