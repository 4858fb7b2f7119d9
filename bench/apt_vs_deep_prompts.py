"""APT vs deep prompts on ViLT-B/32 geometry: extra forward FLOPs and extra forward time.

Random weights from `ViltConfig()` defaults (hidden 768, 12 layers, 12 heads, MLP 3072, patch 32, image 384), a
384×384 image (12×12 = 144 patches + image [CLS]) and `--text-length` text tokens (40, the ViLT maximum), so
N = 40 + 145 = 185 tokens per block. For each p:

* FLOPs: the closed forms of `hf_vpt.flops` ("deep concat" is what `VisualPromptConfig(depth="deep")` runs; "deep
  kv_prefix" is the APT paper's deep-prompt baseline, prompts as keys/values only) and, for the two implemented
  methods, the difference counted by `torch.utils.flop_counter.FlopCounterMode` (prompted minus base).
* Time: median over `--repeats` forwards (after one warm-up) of the prompted model minus that of the base model.

Usage: `python bench/apt_vs_deep_prompts.py [--repeats 7] [--batch 1] [--device cpu]`; writes
`bench/results/apt_vs_deep_prompts.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import hf_vpt  # noqa: E402
from hf_vpt.flops import approx_prompt_flops, deep_prompt_flops  # noqa: E402


def inputs_for(config: transformers.ViltConfig, batch: int, text_length: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, text_length), generator=generator).to(device),
        "attention_mask": torch.ones(batch, text_length, dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(device),
    }


def forward(model, inputs):
    torch.manual_seed(0)  # ViLT draws the order of the image patches with torch.multinomial
    return model(**inputs)


def median_time(model, inputs, repeats: int, device: str) -> float:
    times = []
    with torch.no_grad():
        forward(model, inputs)  # warm-up
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(model, inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def counted_flops(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter:  # grad mode on: torch's module tracker trips over no_grad
        forward(model, inputs)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "apt_vs_deep_prompts.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.ViltConfig()
    base = transformers.ViltForQuestionAnswering(config).eval().to(args.device)
    base.requires_grad_(False)
    inputs = inputs_for(config, args.batch, args.text_length, args.device)
    num_patches = (config.image_size // config.patch_size) ** 2
    seq_len = args.text_length + 1 + num_patches
    d, layers, d_ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size

    base_time = median_time(base, inputs, args.repeats, args.device)
    base_flops = counted_flops(base, inputs)
    rows = []
    for p in args.prompts:
        row = {"p": p}
        row["apt_flops"] = approx_prompt_flops(
            num_layers=layers,
            hidden_size=d,
            seq_len=seq_len,
            num_prompt_tokens=p,
            rank=args.rank,
            batch_size=args.batch,
        )
        for mode in ("concat", "kv_prefix"):
            row[f"deep_{mode}_flops"] = deep_prompt_flops(
                num_layers=layers,
                hidden_size=d,
                intermediate_size=d_ff,
                seq_len=seq_len,
                num_prompt_tokens=p,
                batch_size=args.batch,
                mode=mode,
            )
        for key, adapter in (
            ("apt", hf_vpt.ApproxPromptConfig(num_prompt_tokens=p, rank=args.rank)),
            ("deep_concat", hf_vpt.VisualPromptConfig(num_prompt_tokens=p, depth="deep", kv_prefix=False)),
        ):
            model = get_peft_model(copy.deepcopy(base), adapter).eval()
            model.requires_grad_(False)
            row[f"{key}_flops_counted"] = counted_flops(model, inputs) - base_flops
            row[f"{key}_time_s"] = median_time(model, inputs, args.repeats, args.device) - base_time
            del model
        row["flops_ratio_apt_vs_deep_concat"] = row["apt_flops"] / row["deep_concat_flops"]
        row["flops_ratio_apt_vs_deep_kv_prefix"] = row["apt_flops"] / row["deep_kv_prefix_flops"]
        row["time_ratio_apt_vs_deep_concat"] = row["apt_time_s"] / row["deep_concat_time_s"]
        rows.append(row)

    header = (
        f"{'p':>4} | {'APT GFLOP':>9} | {'deep GFLOP':>10} | {'deep-kv GFLOP':>13} | {'APT/deep':>8} | "
        f"{'APT/deep-kv':>11} | {'APT +ms':>8} | {'deep +ms':>8} | {'t APT/deep':>10}"
    )
    print(
        f"ViLT-B/32 geometry, random weights: d={d}, L={layers}, N={seq_len} tokens ({args.text_length} text + 1 + "
        f"{num_patches} patches), batch {args.batch}, {args.device}, base forward {base_time * 1e3:.1f} ms, "
        f"base {base_flops / 1e9:.2f} GFLOP"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['p']:>4} | {r['apt_flops'] / 1e9:>9.3f} | {r['deep_concat_flops'] / 1e9:>10.3f} | "
            f"{r['deep_kv_prefix_flops'] / 1e9:>13.3f} | {r['flops_ratio_apt_vs_deep_concat']:>8.3f} | "
            f"{r['flops_ratio_apt_vs_deep_kv_prefix']:>11.3f} | {r['apt_time_s'] * 1e3:>8.1f} | "
            f"{r['deep_concat_time_s'] * 1e3:>8.1f} | {r['time_ratio_apt_vs_deep_concat']:>10.3f}"
        )
        assert r["apt_flops_counted"] == r["apt_flops"] and r["deep_concat_flops_counted"] == r["deep_concat_flops"]
    print("(FLOPs = 2 x MACs; counted FLOPs equal the formulas for APT and deep-concat.)")

    result = {
        "setting": {
            "model": "ViltForQuestionAnswering(ViltConfig()) random weights",
            "hidden_size": d,
            "num_layers": layers,
            "intermediate_size": d_ff,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "text_length": args.text_length,
            "seq_len": seq_len,
            "batch": args.batch,
            "rank": args.rank,
            "repeats": args.repeats,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "base_time_s": base_time,
            "base_flops": base_flops,
        },
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
