"""Training step: time and peak memory of each method on a ViT-B/16, against full fine-tuning and plain PyTorch.

ViT-B/16 geometry at 224x224 (random weights: timing does not depend on the values), batch 8, float32, SDPA, CPU.
Each method runs in its own process. One step = forward, cross-entropy, backward, optimiser step; the time is the
median over `--steps` steps after one warm-up step (which also allocates the optimiser state).

Peak memory is measured at the tensor level, on one more (steady-state, untimed) step under `LiveTensorPeak`: the
peak of the bytes of all live tensors (parameters, buffers, optimiser state, gradients, activations saved for
backward, temporaries). "Peak memory over the model" subtracts the parameters, buffers and input pixels, i.e. what
training adds to the loaded model (the optimiser state included); "with the model" does not.

The resident-set growth (`VmHWM` after `/proc/self/clear_refs`, over the warm-up and timed steps, minus the resident
size before them) is reported next to it but is not a measure of what a method needs: with glibc's default malloc it
also counts freed heap memory that the allocator keeps (its mmap threshold grows after the first large free, so later
tensors come from a heap that fragments and is not given back) and the library pages the first step faults in; see
bench/results/train_step_memory.md.

Methods: full fine-tuning (AdamW), linear probing, PEFT LoRA (r=8 on q_proj, v_proj), VPT-shallow and VPT-deep
(p=10, p=50), gated prompt tuning (p=10), APT (p=10); plus "plain PyTorch VPT-deep", the same deep-prompt forward
written out with torch.nn.functional on the same weights (both the concatenation and the key/value-prefix form),
to measure hf_vpt's plumbing overhead.

    python bench/train_step.py                 # the table (about 15 minutes on 2 CPU cores)
    python bench/train_step.py --layers 2 --steps 1 --output /tmp/train_step.json    # a quick look

Prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _vit import build_vit_b16
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setting:
    """One row of the table: a registry training variant (`hf_vpt.registry.training_variant`) with this
    benchmark's prompt count and config fields, or (`plain`) the deep-prompt forward written out in PyTorch."""

    label: str  # the row's name in the table, the JSON and --methods
    variant: str | None = None
    num_prompt_tokens: int = 10
    overrides: tuple = ()  # (field, value) pairs for the variant's config
    optimizer: str = "sgd"  # as the table was measured: AdamW for full fine-tuning and LoRA, SGD + momentum otherwise
    plain: str | None = None  # "concatenation" or "prefix": PlainDeepVPT instead of a registry variant


SETTINGS = [
    Setting("full fine-tuning", "full", optimizer="adamw"),
    Setting("linear probing", "linear"),
    Setting("LoRA r=8 (q, v)", "lora", overrides=(("r", 8),), optimizer="adamw"),
    Setting("VPT-shallow p=10", "vpt_shallow", 10),
    Setting("VPT-shallow p=50", "vpt_shallow", 50),
    Setting("VPT-deep p=10", "vpt_deep", 10),
    Setting("VPT-deep p=50", "vpt_deep", 50),
    Setting("VPT-deep p=10, concatenation", "vpt_deep", 10, overrides=(("kv_prefix", False),)),
    Setting("plain PyTorch VPT-deep p=10, concatenation", plain="concatenation"),
    Setting("plain PyTorch VPT-deep p=10, key/value prefix", plain="prefix"),
    Setting("gated p=10", "gated", 10),
    Setting("APT p=10", "apt", 10),
]
SETTINGS_BY_LABEL = {setting.label: setting for setting in SETTINGS}
METHODS = [setting.label for setting in SETTINGS]


def build_base(layers: int, attn_implementation: str | None = None):
    model = build_vit_b16(layers)
    if attn_implementation is not None:  # the default is the model's own (SDPA for ViT in transformers 5)
        model.set_attn_implementation(attn_implementation)
    return model


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


def make_model(method: str, layers: int, attn_implementation: str | None = None):
    """(model, forward(pixels) -> logits, optimiser) for the row `method` (a `Setting` label). The plain-PyTorch
    forward always calls SDPA."""
    from peft import get_peft_model

    import hf_vpt  # noqa: F401  (registers the methods with PEFT)
    from hf_vpt.registry import training_variant

    if method not in SETTINGS_BY_LABEL:
        raise ValueError(f"No benchmark row {method!r}; choose from {METHODS}.")
    setting = SETTINGS_BY_LABEL[method]
    base = build_base(layers, attn_implementation)
    if setting.plain is not None:
        model = PlainDeepVPT(base, setting.num_prompt_tokens, prefix=setting.plain == "prefix")
        params = [model.prompts, *model.classifier.parameters()]
        return model, model, torch.optim.SGD(params, lr=0.01, momentum=0.9)
    variant = training_variant(setting.variant)
    if variant.trains == "all":
        model = base
    elif variant.trains == "head":
        model = base.requires_grad_(False)
        model.classifier.requires_grad_(True)
    else:
        config = variant.build_config(
            base,
            num_prompt_tokens=setting.num_prompt_tokens,
            head_modules=["classifier"],
            **dict(setting.overrides),
        )
        model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if setting.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return model, lambda x: model(pixel_values=x).logits, optimizer


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while it is entered (a dispatch mode: it sees every op, backward included).

    At entry it counts what is already there: the model's parameters and buffers, the optimiser state and the given
    inputs. Every storage an op creates afterwards is added until it is freed (a weak reference on the storage), so
    the peak covers activations saved for backward, gradients, optimiser state and temporaries, at the allocator's
    level and without what the process keeps besides tensors (library code, freed heap pages). The peak is kept over
    all the `with` blocks; `report()` gives it with the model's own bytes (parameters and buffers) and the inputs'
    bytes apart, so that `peak - model - inputs` is what training adds to the loaded model.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *inputs: torch.Tensor):
        super().__init__()
        self.model, self.optimizer, self.inputs = model, optimizer, inputs
        self.peak = 0

    @staticmethod
    def _storages(tensors) -> dict[int, int]:
        found = {}
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return found

    def __enter__(self):
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        self.model_storages = self._storages([*self.model.parameters(), *self.model.buffers()])
        self.input_storages = self._storages(self.inputs)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.live = {**self.input_storages, **self._storages(state + grads), **self.model_storages}
        self.current = sum(self.live.values())
        self.peak = max(self.peak, self.current)
        self.refs = {}
        return super().__enter__()

    def __exit__(self, *args):
        self.refs = {}  # drop the weak references (and their callbacks)
        return super().__exit__(*args)

    def _freed(self, key: int, _ref) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:  # views and in-place results of known storages
                continue
            self.live[key] = size
            self.refs[key] = weakref.ref(storage, partial(self._freed, key))
            self.current += size
            self.peak = max(self.peak, self.current)
        return out

    def report(self) -> dict:
        model, inputs = sum(self.model_storages.values()), sum(self.input_storages.values())
        return {"peak_mib": self.peak / 2**20, "model_mib": model / 2**20, "inputs_mib": inputs / 2**20}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_one(method: str, batch: int, layers: int, steps: int) -> dict:
    """Runs in a child process: build, time `steps` steps after a warm-up, then measure one step's live tensors."""
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
    rss = (_rss_kib("VmHWM:") - before) / 1024
    # A steady-state step (the optimiser state exists from the warm-up) under the live-tensor tracker; not timed.
    tracker = LiveTensorPeak(model, optimizer, pixels)
    with tracker:
        step()
    memory = tracker.report()
    return {
        "method": method,
        "step_s": statistics.median(times),
        "peak_mib": memory["peak_mib"] - memory["model_mib"] - memory["inputs_mib"],
        "peak_with_model_mib": memory["peak_mib"],
        "model_mib": memory["model_mib"],
        "peak_rss_mib": rss,
        "trainable": trainable,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--output", type=Path, default=RESULTS / "train_step.json", help="where the JSON goes")
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

    def ratio(row, key):
        return f"{row[key] / full[key]:.2f}x" if full else "-"

    print("\n" + header)
    print(
        "| method | trainable params | step (s) | vs full FT | peak memory over the model (MiB) | vs full FT "
        "| peak memory with the model (MiB) | vs full FT | peak RSS growth (MiB) | vs full FT |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {ratio(r, 'step_s')} | {r['peak_mib']:.0f} | "
            f"{ratio(r, 'peak_mib')} | {r['peak_with_model_mib']:.0f} | {ratio(r, 'peak_with_model_mib')} | "
            f"{r['peak_rss_mib']:.0f} | {ratio(r, 'peak_rss_mib')} |"
        )
    plain = {r["method"]: r for r in rows}
    for ours, theirs in [
        ("VPT-deep p=10", "plain PyTorch VPT-deep p=10, key/value prefix"),
        ("VPT-deep p=10, concatenation", "plain PyTorch VPT-deep p=10, concatenation"),
    ]:
        if ours in plain and theirs in plain:
            print(f"plumbing overhead: {ours} / {theirs} = {plain[ours]['step_s'] / plain[theirs]['step_s']:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"setup": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
