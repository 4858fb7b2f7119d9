"""Deep prompts by concatenation vs as a key/value prefix (and APT): extra FLOPs, inference overhead, train step.

ViT-B/16 geometry at 224x224 with random weights (timing does not depend on the values), batch 8, float32. For each
prompt length p the script measures, side by side in one process:

- extra forward FLOPs over the base model, counted by `torch.utils.flop_counter.FlopCounterMode` on a copy of the
  model with eager attention (the counter misses the fused CPU SDPA kernel, and with it the prompts' attention
  terms), and checked to equal `hf_vpt.flops.extra_forward_flops` (the script stops if they differ);
- inference time (median over `--repeats` runs) and its overhead over the base model, with SDPA attention
  (transformers' default for ViT, what users run);
- the time of one training step (forward, backward, SGD step on the trainable parameters), with SDPA attention.

    python bench/kv_prefix.py                      # full table (about 15 minutes on 2 CPU cores)
    python bench/kv_prefix.py --prompts 10 50 --repeats 2 --batch 2 --layers 4   # a quick look

Prints a table and writes bench/results/kv_prefix.json and bench/results/kv_prefix.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _vit import build_vit_b16, num_tokens
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

import hf_vpt


RESULTS = Path(__file__).resolve().parent / "results"
TIMED_ATTENTION = "sdpa"  # transformers' default for ViT: the speed users get
COUNTED_ATTENTION = "eager"  # FlopCounterMode sees eager attention's matmuls but not the fused CPU SDPA kernel


def build_base(layers: int, attn_implementation: str):
    return build_vit_b16(layers, attn_implementation=attn_implementation).eval()


def methods(p: int) -> dict:
    """Each method's config and the `hf_vpt.flops` mode that describes how it runs (APT's formula ignores the mode)."""
    found = {
        "deep, concatenation": (
            hf_vpt.VisualPromptConfig(num_prompt_tokens=p, depth="deep", kv_prefix=False),
            "concat",
        ),
        "deep, key/value prefix": (
            hf_vpt.VisualPromptConfig(num_prompt_tokens=p, depth="deep", kv_prefix=True),
            "shared_kv_prefix",
        ),
    }
    if hasattr(hf_vpt, "ApproxPromptConfig"):
        found["APT"] = (hf_vpt.ApproxPromptConfig(num_prompt_tokens=p), "concat")
    return found


def forward_flops(model, pixels) -> int:
    counter = FlopCounterMode(display=False)
    with counter:  # (FlopCounterMode's module tracker trips over no_grad with trainable inputs)
        model(pixel_values=pixels)
    return counter.get_total_flops()


def counted_extra_flops(layers: int, config, pixels, base_flops: int) -> int:
    """Extra forward FLOPs of `config`, counted on its own eager-attention model (PEFT may edit the config it gets)."""
    model = get_peft_model(build_base(layers, COUNTED_ATTENTION), copy.deepcopy(config)).eval()
    return forward_flops(model, pixels) - base_flops


def check_against_formula(name: str, counted: int, base, config, mode: str, batch: int) -> None:
    """Stop before anything is timed or written when the counter and `hf_vpt.flops` disagree."""
    expected = hf_vpt.flops.extra_forward_flops(base, config, seq_len=num_tokens(base), batch_size=batch, mode=mode)
    if counted != expected:
        raise RuntimeError(
            f"{name}: FlopCounterMode counted {counted:,} extra forward FLOPs with {COUNTED_ATTENTION} attention but "
            f"hf_vpt.flops.extra_forward_flops(mode={mode!r}) gives {expected:,}. The method's forward or its formula "
            "in hf_vpt.flops is wrong: find which and fix it before quoting this table."
        )


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference(model, pixels):
    def run():
        with torch.no_grad():
            model(pixel_values=pixels)

    return run


def train_step(model, pixels, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def run():
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.batch) % 100
    counted_base = build_base(args.layers, COUNTED_ATTENTION)
    base_flops = forward_flops(counted_base, pixels)
    base = build_base(args.layers, TIMED_ATTENTION)
    base_time = median_time(inference(base, pixels), args.repeats)
    rows = []
    for p in args.prompts:
        for name, (config, mode) in methods(p).items():
            extra_flops = counted_extra_flops(args.layers, config, pixels, base_flops)
            check_against_formula(name, extra_flops, counted_base, config, mode, args.batch)
            model = get_peft_model(build_base(args.layers, TIMED_ATTENTION), config).eval()
            infer = median_time(inference(model, pixels), args.repeats)
            model.train()
            step = median_time(train_step(model, pixels, labels), args.repeats)
            rows.append(
                {
                    "p": p,
                    "method": name,
                    "extra_gflops": extra_flops / 1e9,
                    "extra_gflops_per_sample": extra_flops / 1e9 / args.batch,
                    "inference_s": infer,
                    "inference_overhead": infer / base_time - 1,
                    "train_step_s": step,
                }
            )
            print(
                f"p={p:4d} {name:24s} +{extra_flops / 1e9:8.2f} GFLOPs  infer {infer:6.3f}s  step {step:6.3f}s",
                flush=True,
            )
            del model

    concat = {r["p"]: r for r in rows if r["method"] == "deep, concatenation"}
    for row in rows:
        reference = concat[row["p"]]
        row["flops_vs_concat"] = row["extra_gflops"] / reference["extra_gflops"] if reference["extra_gflops"] else None
        row["train_step_vs_concat"] = row["train_step_s"] / reference["train_step_s"]

    header = (
        f"ViT-B/16 geometry, 224x224, batch {args.batch}, {args.layers} blocks, float32, "
        f"{args.threads} CPU threads; FLOPs counted with {COUNTED_ATTENTION} attention (each equal to "
        f"hf_vpt.flops.extra_forward_flops), times with {TIMED_ATTENTION} attention; "
        f"base inference {base_time:.3f}s, base forward {base_flops / 1e9:.1f} GFLOPs"
    )
    print("\n" + header)
    print(
        "| p | method | extra GFLOPs (batch) | vs concatenation | inference overhead | train step (s) | step vs concatenation |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = "-" if r["flops_vs_concat"] is None else f"{r['flops_vs_concat']:.3f}x"
        print(
            f"| {r['p']} | {r['method']} | {r['extra_gflops']:.2f} | {ratio} | {r['inference_overhead']:+.1%} | "
            f"{r['train_step_s']:.3f} | {r['train_step_vs_concat']:.2f}x |"
        )

    RESULTS.mkdir(exist_ok=True)
    summary = {"setup": header, "base_inference_s": base_time, "base_gflops": base_flops / 1e9, "rows": rows}
    (RESULTS / "kv_prefix.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "kv_prefix.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        axes[0].plot([r["p"] for r in mine], [100 * r["inference_overhead"] for r in mine], marker="o", label=name)
        axes[1].plot([r["p"] for r in mine], [r["extra_gflops"] for r in mine], marker="o", label=name)
    axes[0].set(xlabel="prompt tokens p", ylabel="inference overhead over base (%)")
    axes[1].set(xlabel="prompt tokens p", ylabel="extra forward GFLOPs (batch)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
