"""Adapter I/O: file size against the bytes of the tensors it holds, and load time.

For each method on a ViT-B/16 geometry (random weights): the size of adapter_model.safetensors against the bytes of
its tensors (the rest is the safetensors header), the time of `PeftModel.from_pretrained(base, folder)` (config and
file checks, injection, weights) and of `peft_model.load_adapter(folder, name)` onto a model that already has an
adapter. Median over `--repeats`. Target: load < 50 ms.

    python bench/adapter_io.py

Prints a table and writes bench/results/adapter_io.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _vit import build_vit_b16
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import hf_vpt


RESULTS = Path(__file__).resolve().parent / "results"


def build_base(layers: int):
    return build_vit_b16(layers).eval()


def configs():
    head = ["classifier"]
    return {
        "VPT-shallow p=10": hf_vpt.VisualPromptConfig(num_prompt_tokens=10, depth="shallow", modules_to_save=head),
        "VPT-deep p=50": hf_vpt.VisualPromptConfig(num_prompt_tokens=50, depth="deep", modules_to_save=head),
        "gated p=100": hf_vpt.GatedPromptConfig(num_prompt_tokens=100, modules_to_save=head),
        "APT p=200": hf_vpt.ApproxPromptConfig(num_prompt_tokens=200, modules_to_save=head),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--only", default=None, help="Run the adapters whose name contains this text (e.g. APT); no JSON is written."
    )
    args = parser.parse_args()
    rows = []
    for name, config in configs().items():
        if args.only is not None and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as folder:
            get_peft_model(build_base(args.layers), config).save_pretrained(folder)
            path = Path(folder) / "adapter_model.safetensors"
            with safe_open(path, framework="pt") as handle:
                tensor_bytes = sum(
                    handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys()
                )
            from_pretrained, load_adapter = [], []
            for _ in range(args.repeats):
                base = build_base(args.layers)
                start = time.perf_counter()
                model = PeftModel.from_pretrained(base, folder)
                from_pretrained.append(time.perf_counter() - start)
                start = time.perf_counter()
                model.load_adapter(folder, adapter_name="second")
                load_adapter.append(time.perf_counter() - start)
            rows.append(
                {
                    "method": name,
                    "file_bytes": path.stat().st_size,
                    "tensor_bytes": tensor_bytes,
                    "from_pretrained_ms": 1000 * statistics.median(from_pretrained),
                    "load_adapter_ms": 1000 * statistics.median(load_adapter),
                }
            )
            print(rows[-1], flush=True)
    print(f"\nViT-B/16 geometry, {args.layers} blocks, CPU")
    print("| adapter | file (KiB) | tensors (KiB) | overhead | PeftModel.from_pretrained (ms) | load_adapter (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['file_bytes'] / 1024:.1f} | {r['tensor_bytes'] / 1024:.1f} | "
            f"{r['file_bytes'] / r['tensor_bytes'] - 1:+.2%} | {r['from_pretrained_ms']:.1f} | "
            f"{r['load_adapter_ms']:.1f} |"
        )
    if args.only is not None:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapter_io.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
