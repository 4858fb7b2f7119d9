"""One engine, every method: run by `tests/reliability/test_sharded.py` as
`python -m torch.distributed.run --nproc_per_node 2 tests/reliability/sharded_worker.py --engine <engine>
--output <dir>` (gloo, CPU).

For each method, every process:

1. builds the tiny base model and the adapter from the same seed, and trains a single-process reference on the
   whole global batch (no communication: each process computes the same reference);
2. wraps a second copy with the engine and trains it on its half of the same global batch, the same steps;
3. gathers the full state dict (`torch.distributed.checkpoint.state_dict.get_model_state_dict`, the same call for
   every engine) and compares it on rank 0 with the reference and with the untouched base;
4. rank 0 saves the gathered adapter with `save_pretrained(..., state_dict=...)` and loads it with
   `PeftModel.from_pretrained` on a fresh base; the loaded model's logits are compared with the sharded model's.

Engines `zero2` and `zero3` train with `deepspeed.initialize` instead (DeepSpeed's CPU accelerator,
`DS_ACCELERATOR=cpu`, over gloo; float32, the same torch SGD as every other engine, gradient clipping off so that the
update is the single-process one); ZeRO-3's partitioned parameters are gathered with
`deepspeed.zero.GatheredParameters` instead of `get_model_state_dict`.

Rank 0 writes `<output>/<engine>.json`: per method, the measured numbers; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_vpt  # noqa: E402
from hf_vpt.core.layer import PromptedBlock  # noqa: E402
from hf_vpt.testing_utils import build, pixels, tiny_imagegpt  # noqa: E402


ENGINES = ("ddp", "fsdp2_blocks", "fsdp2_wrappers", "fsdp1", "zero2", "zero3")
GLOBAL_BATCH = 4
STEPS = 3
LR = 0.5
METHODS = {
    "vpt_deep": lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep", prompt_dropout=0.0),
    "vpt_shallow": lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="shallow", prompt_dropout=0.0),
    "gated": lambda: hf_vpt.GatedPromptConfig(num_prompt_tokens=3, gate_init=1.0, prompt_dropout=0.0),
    "apt": lambda: hf_vpt.ApproxPromptConfig(num_prompt_tokens=3, rank=2),
    "generative": lambda: hf_vpt.GenerativePromptConfig(num_prompt_tokens=3, num_classes=4, prompt_dropout=0.0),
}
TRANSFORMERS_BLOCKS = ("ViTLayer", "ImageGPTBlock")


def _imagegpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return tiny_imagegpt(codebook_size=16, n_positions=16, **no_dropout).eval()


def _base(method: str) -> nn.Module:
    return _imagegpt() if method == "generative" else build("vit", attn="sdpa")


def _peft(method: str) -> nn.Module:
    model = get_peft_model(_base(method), METHODS[method]())
    torch.manual_seed(3)
    with torch.no_grad():  # larger prompts than their initialisation, so that every method trains visibly
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape) * 0.1)
    return model


def _batches(method: str) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    batches = []
    for step in range(STEPS + 1):  # the last one is for evaluation
        if method == "generative":
            ids = torch.randint(0, 16, (GLOBAL_BATCH, 10), generator=generator)
            ids[:, 0] = 16  # SOS
            labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=generator)
            batches.append({"input_ids": ids, "labels": ids, "class_labels": labels})
        else:
            x = pixels(GLOBAL_BATCH, seed=100 + step)
            batches.append({"pixel_values": x, "labels": torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)})
    return batches


def _half(batch: dict, rank: int, world: int) -> dict:
    size = GLOBAL_BATCH // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.float()


def _train(model: nn.Module, params: list[nn.Parameter], batches: list[dict]) -> None:
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def _wrap(engine: str, model: nn.Module) -> nn.Module:
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if engine in ("fsdp2_blocks", "fsdp2_wrappers"):
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if engine == "fsdp2_blocks" and type(module).__name__ in TRANSFORMERS_BLOCKS:
                fully_shard(module)
            elif engine == "fsdp2_wrappers" and isinstance(module, PromptedBlock):
                fully_shard(module)
        fully_shard(model)
        return model
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        block_classes = {type(m) for m in model.modules() if type(m).__name__ in TRANSFORMERS_BLOCKS}
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy(block_classes),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    raise ValueError(engine)


def _deepspeed_train(stage: int, model: nn.Module, batches: list[dict]) -> nn.Module:
    """DeepSpeed ZeRO-`stage` over the model, trained like `_train`; returns the engine (called like the model)."""
    import deepspeed

    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed would clip the global norm; the reference does not
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a torch optimiser: the same SGD as the reference
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    for batch in batches:
        loss = engine(**batch).loss
        engine.backward(loss)  # averages the gradients over the processes, as DDP does
        engine.step()
    engine.eval()
    return engine


def _gather(engine: str, wrapped: nn.Module, peft_model: nn.Module) -> dict:
    """The full state dict, on every process (collective)."""
    if engine == "zero3":
        import deepspeed

        # every parameter, frozen ones included, is partitioned; gather them all for the read
        with deepspeed.zero.GatheredParameters(list(peft_model.parameters())):
            return {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    if engine == "zero2":  # ZeRO-2 partitions optimiser state and gradients; the parameters are whole everywhere
        return {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    # cpu_offload=False: the tensors are on the CPU already, and FSDP1's offloading copy crashes (SIGSEGV) when the
    # unsharded parameters already live there (torch 2.13, gloo)
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    gathered = get_model_state_dict(peft_model if engine == "ddp" else wrapped, options=options)
    return {k: v.detach().clone() for k, v in gathered.items()}


def _max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def run_method(engine: str, method: str, output: Path, rank: int, world: int) -> dict | None:
    batches = _batches(method)
    *train_batches, eval_batch = batches

    reference = _peft(method)
    pristine = {k: v.clone() for k, v in reference.state_dict().items()}
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    _train(reference, [p for p in reference.parameters() if p.requires_grad], train_batches)
    reference_state = reference.state_dict()
    reference_logits = _logits(reference, eval_batch)

    peft_model = _peft(method)
    halves = [_half(b, rank, world) for b in train_batches]
    if engine.startswith("zero"):
        wrapped = _deepspeed_train(int(engine[-1]), peft_model, halves)
    else:
        wrapped = _wrap(engine, peft_model)
        _train(wrapped, [p for p in wrapped.parameters() if p.requires_grad], halves)
    sharded_logits = _logits(wrapped, eval_batch)  # every rank takes part (FSDP and ZeRO-3 gather in forward)
    # ZeRO-3 keeps only a slice of each parameter on a process (`ds_tensor`); count those that are really split
    partitioned = sum(p.ds_tensor.numel() < p.ds_numel for p in peft_model.parameters() if hasattr(p, "ds_tensor"))

    gathered = _gather(engine, wrapped, peft_model)
    if rank != 0:
        return None
    frozen = [k for k in pristine if k not in set(trainable)]
    result = {
        "trainable": trainable,
        "same_keys": sorted(gathered) == sorted(pristine),
        "prompt_change": min((gathered[k] - pristine[k]).abs().max().item() for k in trainable),
        "vs_single": _max_diff(gathered, reference_state, trainable),
        "base_identical": all(torch.equal(gathered[k], pristine[k]) for k in frozen),
        "sharded_vs_single_logits": (sharded_logits - reference_logits).abs().max().item(),
        "partitioned_params": int(partitioned),
    }
    # Save the gathered adapter from a plain (never wrapped) PeftModel of the same config, then load it.
    directory = output / engine / method
    saver = _peft(method)
    saver.save_pretrained(str(directory), state_dict={k: gathered[k] for k in trainable})
    loaded = PeftModel.from_pretrained(_base(method), str(directory)).eval()
    result["loaded_vs_sharded_logits"] = (_logits(loaded, eval_batch) - sharded_logits).abs().max().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's communication layer over the gloo group
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for method in args.methods:
        results[method] = run_method(args.engine, method, args.output, rank, world)
        dist.barrier()
    if rank == 0:
        (args.output / f"{args.engine}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
