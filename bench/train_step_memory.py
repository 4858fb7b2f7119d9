"""Where the memory of a training step goes: the tensors autograd saves for backward, and the live-tensor peak.

For each method of `bench/train_step.py` (same models, same builder), one forward + cross-entropy is run and the
autograd graph behind the loss is walked: every backward node's saved tensors (`node._saved_*`) are collected, their
storages de-duplicated (a tensor saved by several nodes, or a view of another saved tensor, counts once), and the
bytes are summed per backward-node type. Parameters, buffers and the input pixels are saved by reference and cost
nothing extra; they are listed apart. A storage saved by nodes of several types is listed under all of them, joined
with "+".

Then, with `--steps`, the peak of the live tensors during a full training step (after a warm-up step, so the
optimiser state exists) is measured with `train_step.LiveTensorPeak`.

    python bench/train_step_memory.py --layers 2          # breakdown per op type, 2 blocks (per-block numbers scale)
    python bench/train_step_memory.py --layers 2 --methods "full fine-tuning" "VPT-deep p=10"

Prints one table per method and a side-by-side table of the totals; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from train_step import LiveTensorPeak, make_model


DEFAULT_METHODS = [
    "full fine-tuning",
    "VPT-deep p=10",
    "plain PyTorch VPT-deep p=10, key/value prefix",
    "VPT-deep p=10, concatenation",
    "plain PyTorch VPT-deep p=10, concatenation",
    "VPT-shallow p=10",
    "linear probing",
    "LoRA r=8 (q, v)",
    "gated p=10",
    "APT p=10",
]


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def saved_tensor_breakdown(loss: torch.Tensor, free_storages: set[int]) -> dict:
    """Bytes of the storages saved for backward behind `loss`, per backward-node type (see the module docstring)."""
    saved_by: dict[int, set[str]] = defaultdict(set)
    nbytes: dict[int, int] = {}
    shapes: dict[int, set[str]] = defaultdict(set)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed (not the case before backward) or not a tensor slot
                continue
            for tensor in _tensors(value):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                saved_by[key].add(type(node).__name__)
                nbytes[key] = storage.nbytes()
                shapes[key].add("x".join(map(str, tensor.shape)))
    per_op: dict[str, int] = defaultdict(int)
    per_op_shapes: dict[str, set[str]] = defaultdict(set)
    by_reference = 0
    for key, size in nbytes.items():
        if key in free_storages:
            by_reference += size
            continue
        op = "+".join(sorted(saved_by[key]))
        per_op[op] += size
        per_op_shapes[op] |= shapes[key]
    return {
        "per_op": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "shapes": {op: sorted(s) for op, s in per_op_shapes.items()},
        "total": sum(per_op.values()),
        "by_reference": by_reference,
        "nodes": len(seen),
    }


def profile(method: str, batch: int, layers: int, steps: int, attn_implementation: str | None = None) -> dict:
    model, forward, optimizer = make_model(method, layers, attn_implementation)
    model.train()
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 100
    free = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), pixels]}
    loss = F.cross_entropy(forward(pixels), labels)
    result = {"method": method, **saved_tensor_breakdown(loss, free)}
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del loss
    if steps:
        tracker = LiveTensorPeak(model, optimizer, pixels)
        for _ in range(steps):
            with tracker:
                loss = F.cross_entropy(forward(pixels), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del loss
        result["live_peak"] = tracker.report()
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="tracked steps after the warm-up (0: breakdown only)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--attn", help="attention implementation of the ViT (default: the model's, SDPA)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for method in args.methods:
        row = profile(method, args.batch, args.layers, args.steps, args.attn)
        results.append(row)
        print(f"\n## {method}: {mib(row['total'])} MiB saved for backward ({row['nodes']} backward nodes)")
        print("| saved by (backward node) | MiB | shapes |")
        print("| --- | --- | --- |")
        for op, size in row["per_op"].items():
            print(f"| {op} | {mib(size)} | {', '.join(row['shapes'][op][:4])} |")
        print(f"| (parameters, buffers, pixels: saved by reference) | {mib(row['by_reference'])} | |")
        if "live_peak" in row:
            peak = row["live_peak"]
            over = peak["peak_mib"] - peak["model_mib"] - peak["inputs_mib"]
            print(
                f"live-tensor peak of a training step: {peak['peak_mib']:.1f} MiB with the model "
                f"({peak['model_mib']:.1f} MiB parameters and buffers, {peak['inputs_mib']:.1f} MiB pixels), "
                f"{over:.1f} MiB over the model"
            )

    ops = sorted(
        {op for r in results for op in r["per_op"]}, key=lambda op: -max(r["per_op"].get(op, 0) for r in results)
    )
    print(f"\n## saved for backward, MiB (batch {args.batch}, {args.layers} blocks)")
    print("| op | " + " | ".join(r["method"] for r in results) + " |")
    print("| --- " * (len(results) + 1) + "|")
    for op in ops:
        print(f"| {op} | " + " | ".join(mib(r["per_op"].get(op, 0)) for r in results) + " |")
    print("| **total** | " + " | ".join(f"**{mib(r['total'])}**" for r in results) + " |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"batch": args.batch, "layers": args.layers, "attention": args.attn or "default", "rows": results},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
