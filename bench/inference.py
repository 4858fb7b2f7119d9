"""Inference: throughput against prompt length, and batches that mix adapters.

ViT-B/16 geometry at 224x224 (random weights), float32, SDPA, batch `--batch` (default 8):

1. images/s of deep prompts (hf_vpt's default path) and of APT for p in {0, 1, 10, 50, 100, 200} (p = 0 is the
   base model);
2. a batch that mixes 4 deep-prompt adapters (`adapter_names=[...]`, one forward) against a batch that uses one
   adapter, and against looping over the 4 adapters (`set_adapter` + a forward on each sub-batch).

    python bench/inference.py                 # about 10 minutes on 2 CPU cores
    python bench/inference.py --layers 2 --batch 4 --repeats 2      # a quick look

Prints tables and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _vit import build_vit_b16
from peft import get_peft_model

import hf_vpt


RESULTS = Path(__file__).resolve().parent / "results"


def build_base(layers: int):
    return build_vit_b16(layers).eval()


def seconds(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[0, 1, 10, 50, 100, 200])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.batch < 4:  # the mixed batch gives each of the 4 adapters at least one image
        parser.error(f"--batch must be at least 4 (one image per adapter in the mixed batch); got {args.batch}.")
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    throughput = []
    base = build_base(args.layers)
    base_time = seconds(lambda: base(pixel_values=pixels), args.repeats)
    for p in args.prompts:
        for method in ("deep prompts", "APT"):
            if p == 0:
                model, name = base, "base model"
                if method == "APT":
                    continue
            else:
                config = (
                    hf_vpt.VisualPromptConfig(num_prompt_tokens=p, depth="deep")
                    if method == "deep prompts"
                    else hf_vpt.ApproxPromptConfig(num_prompt_tokens=p)
                )
                model, name = get_peft_model(build_base(args.layers), config).eval(), method
            elapsed = base_time if p == 0 else seconds(lambda: model(pixel_values=pixels), args.repeats)
            throughput.append(
                {"p": p, "method": name, "images_per_s": args.batch / elapsed, "vs_base": base_time / elapsed}
            )
            print(
                f"p={p:4d} {name:14s} {args.batch / elapsed:7.2f} images/s ({base_time / elapsed:.2f}x base)",
                flush=True,
            )

    # mixed-adapter batches
    adapters = ["a0", "a1", "a2", "a3"]
    model = None
    for i, name in enumerate(adapters):
        config = hf_vpt.VisualPromptConfig(num_prompt_tokens=10, depth="deep")
        model = get_peft_model(build_base(args.layers), config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
    model.eval()
    names = [adapters[i % 4] for i in range(args.batch)]

    def loop():
        for name in adapters:
            rows = [i for i, n in enumerate(names) if n == name]
            model.set_adapter(name)
            model(pixel_values=pixels[rows])

    model.set_adapter("a0")
    single = seconds(lambda: model(pixel_values=pixels), args.repeats)
    mixed = seconds(lambda: model(pixel_values=pixels, adapter_names=names), args.repeats)
    looped = seconds(loop, args.repeats)
    mixing = {
        "single_adapter_s": single,
        "mixed_4_adapters_s": mixed,
        "loop_over_4_adapters_s": looped,
        "mixed_vs_single_throughput": single / mixed,
        "mixed_vs_loop_throughput": looped / mixed,
    }

    header = f"ViT-B/16 geometry, 224x224, batch {args.batch}, {args.layers} blocks, float32, CPU"
    print("\n" + header)
    print("| p | method | images/s | vs base |\n| --- | --- | --- | --- |")
    for r in throughput:
        print(f"| {r['p']} | {r['method']} | {r['images_per_s']:.2f} | {r['vs_base']:.2f}x |")
    print(f"\n| batch of {args.batch}, deep p=10 | seconds | throughput vs mixed |\n| --- | --- | --- |")
    print(f"| one adapter | {single:.3f} | {mixed / single:.2f}x |")
    print(f"| 4 adapters mixed, one forward | {mixed:.3f} | 1.00x |")
    print(f"| loop over 4 adapters | {looped:.3f} | {mixed / looped:.2f}x |")
    print(
        f"mixed / single-adapter throughput: {single / mixed:.2f}x (target >= 0.95x); "
        f"mixed / loop: {looped / mixed:.2f}x"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(
        json.dumps({"setup": header, "throughput": throughput, "mixed_adapters": mixing}, indent=2)
    )


if __name__ == "__main__":
    main()
