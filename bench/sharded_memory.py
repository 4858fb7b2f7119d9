"""Memory per process of a VPT-deep training step: FSDP2 (`fully_shard` per ViTLayer + root) against DDP.

A 12-block ViT-B/16 geometry (hidden 768, 12 heads, MLP 3072, image 224, patch 16, random weights built from a
config by `bench/_vit.py`, nothing downloaded) with VPT-deep (50 prompts by default, key/value-prefix path), on 2 CPU
processes over gloo, float32, SGD with momentum, batch 2 per process. Each engine runs in its own
`torch.distributed.run` launch; per process it measures:

* parameters: all, trainable, and the elements this process stores (FSDP2: its shards; DDP: everything);
* tensors at rest: the bytes of every live tensor storage after a warm-up step (parameters, buffers, optimiser
  state, DDP's gradient buckets, FSDP2's shards and the buffers it keeps);
* the peak of live tensor storages during the next training step (forward, backward, optimiser step).

Live-tensor memory is counted the way `bench/train_step.py`'s `LiveTensorPeak` does (a dispatch mode that sees every
op, C++ callers such as DDP's reducer included, and a weak reference per storage to see it freed), with two changes
for sharding: the mode is entered before the model is built, so that storages only C++ holds (DDP's buckets) are
counted, and at every op during the measured step the current size of every tracked storage is summed again,
because FSDP2 frees and re-allocates its unsharded parameters by resizing their storages in place
(`storage.resize_`), which no op reports. Not counted: what the process holds besides tensors (the interpreter,
libraries, freed heap pages) and gloo's internal transport buffers; DTensor ops (FSDP2's optimiser step on shards)
are seen as one op each, their inner temporaries are not.

    python bench/sharded_memory.py                      # both engines, prints the table
    python bench/sharded_memory.py --prompts 50 --batch 2 --json bench/results/sharded_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("ddp", "fsdp2")


class LiveStorages(TorchDispatchMode):
    """Every tensor storage created while entered, until it is freed; `peak` while `measuring` (see the docstring)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.measuring = False
        self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):  # DTensor: its local shard holds the memory
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl: stable when the storage is resized, unlike its data pointer
        if key not in self.refs:
            self.refs[key] = weakref.ref(storage, partial(self._freed, key))

    def __exit__(self, *args):
        # drop the weak references and their callbacks: left behind, they crash process teardown after FSDP2
        # ("terminate called without an active exception", then a hang of the other process)
        self.refs = {}
        return super().__exit__(*args)

    def _freed(self, key: int, _ref) -> None:
        self.refs.pop(key, None)

    def total(self) -> int:
        return sum(storage.nbytes() for ref in list(self.refs.values()) if (storage := ref()) is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        if self.measuring:
            self.peak = max(self.peak, self.total())
        return out


def _wrap(engine: str, model: torch.nn.Module) -> torch.nn.Module:
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__ == "ViTLayer":
            fully_shard(module)
    fully_shard(model)
    return model


def _local_numel(param: torch.Tensor) -> int:
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


def worker(args) -> None:
    sys.path.insert(0, str(HERE))
    from _vit import build_vit_b16
    from peft import get_peft_model

    import hf_vpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tracker = LiveStorages()
    with tracker:
        config = hf_vpt.VisualPromptConfig(
            num_prompt_tokens=args.prompts, depth="deep", modules_to_save=["classifier"]
        )
        model = get_peft_model(build_vit_b16(layers=args.layers), config)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        wrapped = _wrap(args.engine, model)
        held = sum(_local_numel(p) for p in wrapped.parameters())
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)
        pixels = torch.randn(args.batch, 3, 224, 224, generator=generator)
        labels = torch.randint(0, 100, (args.batch,), generator=generator)
        wrapped.train()

        def step():
            loss = F.cross_entropy(wrapped(pixel_values=pixels).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: optimiser state, FSDP2's lazy initialisation
        dist.barrier()
        at_rest = tracker.total()
        tracker.measuring, tracker.peak = True, at_rest
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        tracker.measuring = False
    row = {
        "rank": rank,
        "parameters": total,
        "trainable": trainable,
        "held": held,
        "at_rest": at_rest,
        "peak": tracker.peak,
        "seconds": seconds,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.output).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, args, directory: Path) -> list[dict]:
    output = directory / f"{engine}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
        "--master_port", str(_free_port()), __file__, "--worker", "--engine", engine, "--output", str(output),
        "--prompts", str(args.prompts), "--batch", str(args.batch), "--layers", str(args.layers),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(output.read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2, help="images per process")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as directory:
        results = {engine: launch(engine, args, Path(directory)) for engine in ENGINES}
    names = {"ddp": "DDP", "fsdp2": "FSDP2 (ViTLayer + root)"}
    print(
        f"\n## VPT-deep p={args.prompts}, ViT-B/16 geometry ({args.layers} blocks), {args.processes} CPU processes "
        f"(gloo), batch {args.batch} per process, float32, one training step"
    )
    print(
        "| engine | parameters (trainable) | parameter elements held per process | tensors at rest per process, MiB "
        "| peak live tensors in the step per process, MiB | peak over rest, MiB | step, s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for engine, rows in results.items():

        def per_rank(key, fmt=mib):
            return " / ".join(fmt(r[key]) for r in rows)

        print(
            f"| {names[engine]} | {rows[0]['parameters']:,} ({rows[0]['trainable']:,}) "
            f"| {per_rank('held', lambda n: f'{n:,}')} | {per_rank('at_rest')} | {per_rank('peak')} "
            f"| {' / '.join(mib(r['peak'] - r['at_rest']) for r in rows)} "
            f"| {per_rank('seconds', lambda s: f'{s:.1f}')} |"
        )
    print("(per process: rank 0 / rank 1)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
