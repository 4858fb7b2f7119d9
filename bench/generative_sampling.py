"""Autoregressive sampling of a generative-prompted ImageGPT: no prompts, prompts uncached, cached class prefixes.

A small ImageGPT with random weights (timing does not depend on the values; the 512 colour clusters + SOS of the
released models), a `GenerativePromptConfig` adapter with `p` prompts and `C` classes, a batch whose labels mix the
classes, float32. Each row samples a full `side x side` image (`side²` decoding steps) with the same seed:

- no prompts: the frozen model (adapter disabled), with its key/value cache;
- prompts, recomputed every step: `use_cache=False`, every forward carries the whole sequence and the prompts;
- prompts in the first forward: `cache_prompt_prefix=False`, each sample's prompts go through the first forward
  and stay in the key/value cache (the path before class prefixes);
- class prefixes, built in the call: `cache_prompt_prefix=True` (the default), one forward of the prompts alone for
  the distinct classes of the batch, gathered per sample;
- class prefixes, reused: a `PromptPrefixCache` filled by an earlier call, so the call runs no prompt row at all.

For each row: the median wall time over `--repeats` runs (the rows take turns, so a change of load hits them all),
its ratio to the unprompted sampler, the forward FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`
(independent of the machine's load), and the prompt rows that went through the model. The prompted rows must give
the same samples; the script checks it.

    python bench/generative_sampling.py                       # 8x8 tokens, 4 layers, width 128, batch 16, p 32
    python bench/generative_sampling.py --side 16 --no-recompute --repeats 2

Prints a table and writes bench/results/generative_sampling.json (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

import hf_vpt
from hf_vpt.sampling import PromptPrefixCache, autoregressive_sample


RESULTS = Path(__file__).resolve().parent / "results"


def build_model(args):
    torch.manual_seed(0)
    config = ImageGPTConfig(
        vocab_size=513,
        n_positions=args.side * args.side,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
    )
    base = ImageGPTForCausalImageModeling(config).eval()
    adapter = hf_vpt.GenerativePromptConfig(num_prompt_tokens=args.prompts, num_classes=args.classes)
    model = get_peft_model(base, adapter).eval()
    with torch.no_grad():  # non-trivial prompts (the initialisation is close to zero)
        seeded = torch.Generator().manual_seed(1)
        for param in model.base_model.generative_prompt_bank["default"].parameters():
            param.copy_(torch.randn(param.shape, generator=seeded) * 0.5)
    return model


def median_times(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; the repeats go round all of them, so a load change hits every row."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for mine, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - start)
    return [statistics.median(mine) for mine in times]


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8, help="image side in tokens (side² decoding steps)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: more threads thrash on a shared machine")
    parser.add_argument("--no-recompute", action="store_true", help="skip the use_cache=False row (slow)")
    parser.add_argument("--output", type=Path, default=RESULTS / "generative_sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args)
    labels = torch.arange(args.batch) % args.classes
    distinct = int(labels.unique().numel())
    steps = args.side * args.side
    warm = PromptPrefixCache(model)
    warm.for_batch(labels)  # fills the prefixes that the "reused" row finds

    def sampler(**kwargs):
        def run():
            return autoregressive_sample(
                model, class_labels=labels, top_k=40, generator=torch.Generator().manual_seed(0), **kwargs
            )

        return run

    def unprompted():
        with model.disable_adapter():
            return autoregressive_sample(
                model, batch_size=args.batch, top_k=40, generator=torch.Generator().manual_seed(0)
            )

    p, batch = args.prompts, args.batch
    setups = [("no prompts", unprompted, 0)]
    if not args.no_recompute:
        setups.append(("prompts, recomputed every step", sampler(use_cache=False), steps * batch * p))
    setups += [
        ("prompts in the first forward", sampler(cache_prompt_prefix=False), batch * p),
        ("class prefixes, built in the call", sampler(cache_prompt_prefix=True), distinct * p),
        ("class prefixes, reused", sampler(cache_prompt_prefix=warm), 0),
    ]

    samples = {name: fn() for name, fn, _ in setups}  # warm-up, and the samples compared below
    timings = median_times([fn for _, fn, _ in setups], args.repeats)
    rows = []
    for (name, fn, prompt_rows), seconds in zip(setups, timings):
        flops = counted_flops(fn)
        rows.append({"method": name, "seconds": seconds, "gflops": flops / 1e9, "prompt_rows": prompt_rows})
        print(f"{name:36s} {seconds:7.3f}s  {flops / 1e9:8.3f} GFLOPs  {prompt_rows:6d} prompt rows", flush=True)
    assert warm.num_prefix_forwards == 1, "the reused prefixes were computed again"

    prompted = [name for name, _, _ in setups if name != "no prompts"]
    same = all(torch.equal(samples[name], samples[prompted[0]]) for name in prompted)
    base = rows[0]
    for row in rows:
        row["time_vs_no_prompts"] = row["seconds"] / base["seconds"]
        row["flops_vs_no_prompts"] = row["gflops"] / base["gflops"]

    header = (
        f"ImageGPT {args.side}x{args.side} tokens ({steps} steps), {args.layers} layers, width {args.width}, "
        f"{args.heads} heads, vocab 513, float32; p={p} prompts, {args.classes} classes, batch {batch} "
        f"({distinct} distinct classes), top-k 40, {args.threads} CPU threads, median of {args.repeats}"
    )
    print("\n" + header)
    print("| method | time (s) | vs no prompts | forward GFLOPs | vs no prompts | prompt rows through the model |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['seconds']:.3f} | {r['time_vs_no_prompts']:.2f}x | {r['gflops']:.3f} | "
            f"{r['flops_vs_no_prompts']:.3f}x | {r['prompt_rows']} |"
        )
    print(f"prompted samplers give the same samples: {same}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"setup": header, "args": {**vars(args), "output": str(args.output)}, "same_samples": same, "rows": rows}
    args.output.write_text(json.dumps(summary, indent=2))
    if not same:
        raise SystemExit("the prompted samplers disagree")


if __name__ == "__main__":
    main()
