"""Every method under every engine, on 2 CPU processes (gloo): how far the trained adapter is from one process.

Two kinds of columns:

* `torch.distributed` / `deepspeed` directly: one `torch.distributed.run` launch of
  `tests/reliability/sharded_worker.py` per engine (DDP; FSDP2 `fully_shard` on the transformers blocks and the
  root; FSDP2 on hf_vpt's block wrappers; FSDP1 `use_orig_params=True`; DeepSpeed ZeRO-2 and ZeRO-3), which trains
  each method and compares the gathered adapter with single-process training on the same global batch
  (`tests/reliability/test_sharded.py` asserts on the same numbers);
* the recipes with the shipped accelerate configs (`recipes/accelerate_fsdp2.yaml`, `recipes/accelerate_zero3.yaml`)
  through accelerate's own engine code, applied on the CPU processes by
  `tests/reliability/accelerate_engine_on_cpu.py` (`tests/reliability/test_recipe_sharded.py` checks the same
  launches): `recipes/image_classification.py` against one process with the same global batch, and for generative
  prompts `recipes/generative_transfer.py --tiny` (UVit2D) against a plain DDP launch, since it draws its masks per
  process. Every recipe run clips gradients at 1.0, as the ZeRO-3 config does.

Each cell is the largest absolute difference over the trained tensors (float32); the script exits with an error when
a cell is above the tests' bound, 1e-5. Takes about 5 minutes on 2 cores.

    python bench/sharded_matrix.py
    python bench/sharded_matrix.py --json bench/results/sharded_matrix.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from shared_helpers import distributed_run_env, write_tiny_vit_and_images  # noqa: E402  (tests/)


RELIABILITY = ROOT / "tests" / "reliability"
METHODS = ("vpt_deep", "vpt_shallow", "gated", "apt", "generative")
DIRECT_ENGINES = {
    "ddp": "DDP",
    "fsdp2_blocks": "FSDP2, blocks",
    "fsdp2_wrappers": "FSDP2, hf_vpt wrappers",
    "fsdp1": "FSDP1",
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
}
RECIPE_ENGINES = {"recipe_fsdp2": "recipe + fsdp2.yaml", "recipe_zero3": "recipe + zero3.yaml"}
CLIP = ["--max_grad_norm", "1.0"]
TOLERANCE = 1e-5  # the tests' bound on every cell


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list, **extra_env: str) -> None:
    done = subprocess.run(
        command, cwd=ROOT, env=distributed_run_env(**extra_env), capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def direct_engine(engine: str, workdir: Path) -> dict:
    """method -> largest difference from single-process training, for one engine driven directly."""
    extra = {"DS_ACCELERATOR": "cpu"} if engine.startswith("zero") else {}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(RELIABILITY / "sharded_worker.py"), "--engine", engine, "--output",
               str(workdir)]  # fmt: skip
    _run(command, **extra)
    results = json.loads((workdir / f"{engine}.json").read_text())
    return {method: result["vs_single"] for method, result in results.items()}


def _launch(config: str | None, recipe: str, args: list, launcher_args=()) -> None:
    """`accelerate launch` of a recipe with a shipped config (the engine applied on the CPU processes), or plain
    DDP when `config` is None."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
                str(_free_port()), "--mixed_precision", "no"]  # fmt: skip
    if config is None:
        command = [*launcher, "--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no", str(ROOT / recipe)]
    else:
        command = [*launcher, "--config_file", str(ROOT / "recipes" / f"accelerate_{config}.yaml"), *launcher_args,
                   str(RELIABILITY / "accelerate_engine_on_cpu.py"), str(ROOT / recipe)]  # fmt: skip
    _run([*command, *args])


def _config(recipe_engine: str) -> str:
    return recipe_engine.removeprefix("recipe_")  # recipes/accelerate_<this>.yaml


def _max_difference(folder: Path, reference: Path) -> float:
    tensors = {}
    for path in (folder, reference):
        tensors[path] = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    actual, expected = tensors[folder], tensors[reference]
    if sorted(actual) != sorted(expected):
        raise RuntimeError(f"{folder} and {reference} hold different tensors")
    return max((actual[key] - expected[key]).abs().max().item() for key in expected)


def recipe_engines(workdir: Path) -> dict:
    """(engine, method) -> largest difference of the recipe's adapter from its reference."""
    data = workdir / "data"
    write_tiny_vit_and_images(data, {"train": 8, "val": 2})

    def classification_args(method: str, batch: int, out: Path) -> list:
        return ["--model_name_or_path", str(data / "tiny-vit"), "--train_dir", str(data / "train"),
                "--validation_dir", str(data / "val"), "--method", method, "--num_prompt_tokens", "3",
                "--num_train_epochs", "2", "--learning_rate", "0.05", "--per_device_train_batch_size", str(batch),
                "--output_dir", str(out), "--disable_tqdm", *CLIP]  # fmt: skip

    found = {}
    for method in METHODS[:-1]:
        single = workdir / f"single-{method}"
        command = [sys.executable, str(ROOT / "recipes" / "image_classification.py")]
        _run([*command, *classification_args(method, 8, single)])
        for engine in RECIPE_ENGINES:
            out = workdir / f"{engine}-{method}"
            _launch(_config(engine), "recipes/image_classification.py", classification_args(method, 4, out))
            found[engine, method] = _max_difference(out, single)
    generative = ["--tiny", "--model", "uvit", "--max_train_steps", "3", "--per_device_train_batch_size", "2",
                  "--disable_tqdm", "--report_to", "none", *CLIP]  # fmt: skip
    _launch(None, "recipes/generative_transfer.py", [*generative, "--output_dir", str(workdir / "ddp-generative")])
    for engine in RECIPE_ENGINES:
        out = workdir / f"{engine}-generative"
        wrap = ["--fsdp_transformer_layer_cls_to_wrap", "BasicTransformerBlock"] if engine == "recipe_fsdp2" else []
        _launch(_config(engine), "recipes/generative_transfer.py", [*generative, "--output_dir", str(out)], wrap)
        found[engine, "generative"] = _max_difference(out / "adapter", workdir / "ddp-generative" / "adapter")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    table = {}
    with tempfile.TemporaryDirectory() as workdir:
        for engine in DIRECT_ENGINES:
            folder = Path(workdir) / engine
            folder.mkdir()
            for method, difference in direct_engine(engine, folder).items():
                table[engine, method] = difference
            print(f"{engine}: done", flush=True)
        table.update(recipe_engines(Path(workdir)))
    columns = {**DIRECT_ENGINES, **RECIPE_ENGINES}
    print(f"\ntorch {torch.__version__}; largest |sharded - reference| over the trained tensors, float32\n")
    print("| method | " + " | ".join(columns.values()) + " |")
    print("| --- |" + " --- |" * len(columns))
    for method in METHODS:
        cells = [f"{table[engine, method]:.1e}" for engine in columns]
        print(f"| {method} | " + " | ".join(cells) + " |")
    failed = {key: value for key, value in table.items() if not value <= TOLERANCE}
    if args.json:
        rows = [
            {"engine": engine, "method": method, "max_abs_difference": value}
            for (engine, method), value in table.items()
        ]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if failed:
        raise SystemExit(f"above the tests' tolerance {TOLERANCE}: {failed}")


if __name__ == "__main__":
    main()
