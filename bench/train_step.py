"""Training step: time and peak memory of each method on a ViT-B/16, against full fine-tuning and plain PyTorch.

ViT-B/16 geometry at 224x224 (random weights: timing does not depend on the values), batch 8, float32, SDPA.
Each method runs in its own process, so its peak memory (peak resident set size, reset with
`/proc/self/clear_refs` after the model and optimiser are built) is its own. One step = forward, cross-entropy,
backward, optimiser step; the time is the median over `--steps` steps after one warm-up step.

Methods: full fine-tuning (AdamW), linear probing, PEFT LoRA (r=8 on q_proj, v_proj), VPT-shallow and VPT-deep
(p=10, p=50), gated prompt tuning (p=10), APT (p=10); plus "plain PyTorch VPT-deep", the same deep-prompt forward
written out with torch.nn.functional on the same weights (both the concatenation and the key/value-prefix form),
to measure hf_vpt's plumbing overhead.

    python bench/train_step.py                 # the table (about 15 minutes on 2 CPU cores)
    python bench/train_step.py --batch 2 --layers 2 --steps 2    # a quick look

Prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _vit import build_vit_b16


RESULTS = Path(__file__).resolve().parent / "results"
METHODS = [
    "full fine-tuning",
    "linear probing",
    "LoRA r=8 (q, v)",
    "VPT-shallow p=10",
    "VPT-shallow p=50",
    "VPT-deep p=10",
    "VPT-deep p=50",
    "VPT-deep p=10, concatenation",
    "plain PyTorch VPT-deep p=10, concatenation",
    "plain PyTorch VPT-deep p=10, key/value prefix",
    "gated p=10",
    "APT p=10",
]


def build_base(layers: int):
    return build_vit_b16(layers)


class PlainDeepVPT(torch.nn.Module):
    """VPT-deep on a ViT, written out with torch.nn.functional from the model's weights (no hf_vpt, no hooks)."""

    def __init__(self, vit_model, num_tokens: int, prefix: bool):
        super().__init__()
        self.model = vit_model.requires_grad_(False)
        self.prefix = prefix
        config = vit_model.config
        self.prompts = torch.nn.Parameter(torch.zeros(config.num_hidden_layers, num_tokens, config.hidden_size))
        torch.nn.init.uniform_(self.prompts, -0.0625, 0.0625)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values):
        vit, cfg = self.model.vit, self.model.config
        d, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps
        emb = vit.embeddings
        x = (
            F.conv2d(
                pixel_values,
                emb.patch_embeddings.projection.weight,
                emb.patch_embeddings.projection.bias,
                stride=cfg.patch_size,
            )
            .flatten(2)
            .transpose(1, 2)
        )
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
        batch, p = x.shape[0], self.prompts.shape[1]

        def split(t):
            return t.view(t.shape[0], -1, heads, d // heads).transpose(1, 2)

        for i, layer in enumerate(vit.layers):
            a = layer.attention
            prompts = self.prompts[i][None]
            if not self.prefix:
                x = torch.cat([x[:, :1], prompts.expand(batch, -1, -1), x[:, 1 if i == 0 else 1 + p :]], dim=1)
            y = F.layer_norm(x, (d,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
            q, k, v = (split(F.linear(y, m.weight, m.bias)) for m in (a.q_proj, a.k_proj, a.v_proj))
            if self.prefix:
                yp = F.layer_norm(prompts, (d,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
                kp, vp = (
                    split(F.linear(yp, m.weight, m.bias)).expand(batch, -1, -1, -1) for m in (a.k_proj, a.v_proj)
                )
                k, v = torch.cat([k[:, :, :1], kp, k[:, :, 1:]], 2), torch.cat([v[:, :, :1], vp, v[:, :, 1:]], 2)
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, d)
            x = x + F.linear(attn, a.o_proj.weight, a.o_proj.bias)
            y = F.layer_norm(x, (d,), layer.layernorm_after.weight, layer.layernorm_after.bias, eps)
            x = x + F.linear(
                F.gelu(F.linear(y, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias
            )
        x = F.layer_norm(x[:, 0], (d,), vit.layernorm.weight, vit.layernorm.bias, eps)
        return self.classifier(x)


def make_model(method: str, layers: int):
    """(model, forward(pixels) -> logits, optimiser)."""
    from peft import LoraConfig, get_peft_model

    import hf_vpt

    base = build_base(layers)
    head = ["classifier"]
    if method.startswith("plain PyTorch"):
        model = PlainDeepVPT(base, 10, prefix="prefix" in method)
        params = [model.prompts, *model.classifier.parameters()]
        return model, model, torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if method == "full fine-tuning":
        return base, lambda x: base(pixel_values=x).logits, torch.optim.AdamW(base.parameters(), lr=1e-4)
    if method == "linear probing":
        base.requires_grad_(False)
        base.classifier.requires_grad_(True)
        model = base
    elif method.startswith("LoRA"):
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=head))
    else:
        p = int(method.split("p=")[1].split(",")[0])
        if method.startswith("VPT"):
            config = hf_vpt.VisualPromptConfig(
                num_prompt_tokens=p,
                depth="shallow" if "shallow" in method else "deep",
                modules_to_save=head,
                kv_prefix="concatenation" not in method,
            )
        elif method.startswith("gated"):
            config = hf_vpt.GatedPromptConfig(num_prompt_tokens=p, modules_to_save=head)
        else:
            config = hf_vpt.ApproxPromptConfig(num_prompt_tokens=p, modules_to_save=head)
        model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(params, lr=1e-4)
        if method.startswith("LoRA")
        else torch.optim.SGD(params, lr=0.01, momentum=0.9)
    )
    return model, lambda x: model(pixel_values=x).logits, optimizer


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_one(method: str, batch: int, layers: int, steps: int) -> dict:
    """Runs in a child process: build, reset the peak-RSS counter, time `steps` steps."""
    model, forward, optimizer = make_model(method, layers)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 100

    def step():
        loss = F.cross_entropy(forward(pixels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS:")
    step()  # warm-up; also allocates the optimiser state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM:") - before
    return {"method": method, "step_s": statistics.median(times), "peak_mib": peak / 1024, "trainable": trainable}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.batch, args.layers, args.steps)))
        return

    rows = []
    for method in args.methods:
        command = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--batch",
            str(args.batch),
            "--layers",
            str(args.layers),
            "--steps",
            str(args.steps),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
        print(f"{method:46s} step {row['step_s']:7.3f}s  peak +{row['peak_mib']:8.1f} MiB", flush=True)

    full = next((r for r in rows if r["method"] == "full fine-tuning"), None)
    header = f"ViT-B/16 geometry, 224x224, batch {args.batch}, {args.layers} blocks, float32, CPU"
    print("\n" + header)
    print("| method | trainable params | step (s) | vs full FT | peak memory (MiB) | vs full FT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        time_ratio = f"{r['step_s'] / full['step_s']:.2f}x" if full else "-"
        mem_ratio = f"{r['peak_mib'] / full['peak_mib']:.2f}x" if full else "-"
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {time_ratio} | {r['peak_mib']:.0f} | "
            f"{mem_ratio} |"
        )
    plain = {r["method"]: r for r in rows}
    for ours, theirs in [
        ("VPT-deep p=10", "plain PyTorch VPT-deep p=10, key/value prefix"),
        ("VPT-deep p=10, concatenation", "plain PyTorch VPT-deep p=10, concatenation"),
    ]:
        if ours in plain and theirs in plain:
            print(f"plumbing overhead: {ours} / {theirs} = {plain[ours]['step_s'] / plain[theirs]['step_s']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
