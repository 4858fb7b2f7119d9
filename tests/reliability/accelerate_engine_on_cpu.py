"""Run a recipe under `accelerate launch` with the launcher's FSDP or DeepSpeed engine applied on CPU processes.

accelerate applies FSDP and DeepSpeed on accelerators only: on CPU processes `AcceleratorState` keeps `MULTI_CPU`
and the launch silently runs DDP. Both engines themselves run on CPU (torch's `fully_shard` and DeepSpeed's CPU
accelerator over gloo; `test_sharded.py` drives them directly), so this shim lets CI drive them through accelerate's
own code, the path a user's `accelerate launch --config_file fsdp.yaml recipes/...` takes on GPUs: `prepare`
(`fully_shard` per block and root, or `deepspeed.initialize`), gradient clipping, `get_state_dict`, `save_state` and
`load_state`. What it changes:

* on CPU processes, after accelerate has set its state up from the launcher's environment, the engine the launcher
  asked for replaces `MULTI_CPU`, with the plugin accelerate built for it, set up as `AcceleratorState` does on a GPU
  (`accelerate/state.py`: FSDP's mixed-precision policy; DeepSpeed's precision, plugin selection and transformers
  registration). On a GPU the state is accelerate's own;
* ZeRO-3 partitions every tensor, however small (on CPU and GPU alike): DeepSpeed keeps tensors under 1e5 elements
  whole on every rank, which would leave the tiny test models' prompts unpartitioned, unlike a real backbone's
  (VPT-deep on ViT-B: 12 x 50 x 768);
* with `HF_VPT_ENGINE_REPORT=<folder>`, each process writes `<folder>/rank<r>.json` after `accelerator.prepare` of
  the model: what the engine did to its parameters (how many are DTensors, how many ZeRO-3 partitioned), so that a
  test sees the engine really ran.

    python -m accelerate.commands.launch --config_file recipes/accelerate_fsdp2.yaml ... \\
        tests/reliability/accelerate_engine_on_cpu.py recipes/image_classification.py <recipe options>
"""

from __future__ import annotations

import json
import os
import runpy
import sys

from accelerate import Accelerator, state
from accelerate.utils import DistributedType


def _asked(flag: str) -> bool:
    return os.environ.get(flag, "false").lower() == "true"


def _deepspeed_plugins(kwargs: dict) -> list:
    plugins = kwargs.get("deepspeed_plugin")
    if plugins is None:
        return []
    return list(plugins.values()) if isinstance(plugins, dict) else [plugins]


def _partition_every_tensor(kwargs: dict) -> None:
    for plugin in _deepspeed_plugins(kwargs):
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        if zero.get("stage") == 3:
            zero["stage3_param_persistence_threshold"] = 0


def _apply_engine(accelerator_state, kwargs: dict) -> None:
    if accelerator_state.distributed_type != DistributedType.MULTI_CPU:
        return  # a GPU launch: accelerate has applied the engine itself
    precision = accelerator_state._mixed_precision
    if _asked("ACCELERATE_USE_FSDP") and kwargs.get("fsdp_plugin") is not None:
        plugin = kwargs["fsdp_plugin"]
        if precision != "no":
            plugin.set_mixed_precision(precision)
        accelerator_state.fsdp_plugin = plugin
        engine = DistributedType.FSDP
    elif _asked("ACCELERATE_USE_DEEPSPEED") and _deepspeed_plugins(kwargs):
        plugins = _deepspeed_plugins(kwargs)
        for plugin in plugins:
            plugin.set_mixed_precision(precision)
        plugins[0].select(_from_accelerator_state=True)  # registers the config with transformers, as on a GPU
        accelerator_state.deepspeed_plugins = kwargs["deepspeed_plugin"]
        accelerator_state._mixed_precision = "no"  # DeepSpeed handles precision through its own config
        engine = DistributedType.DEEPSPEED
    else:
        return
    # AcceleratorState copies PartialState's fields on every instantiation: set the engine in both.
    accelerator_state.distributed_type = engine
    state.PartialState._shared_state["distributed_type"] = engine


_accelerator_state_init = state.AcceleratorState.__init__


def _init_with_engine(self, *args, **kwargs):
    _partition_every_tensor(kwargs)
    _accelerator_state_init(self, *args, **kwargs)
    _apply_engine(self, kwargs)


_prepare = Accelerator.prepare


def _prepare_and_report(self, *args, **kwargs):
    prepared = _prepare(self, *args, **kwargs)
    folder = os.environ.get("HF_VPT_ENGINE_REPORT")
    objects = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
    models = [obj for obj in objects if hasattr(obj, "parameters")]
    if folder and models:
        from torch.distributed.tensor import DTensor

        parameters = [param for model in models for param in model.parameters()]
        report = {
            "distributed_type": self.distributed_type.value,
            "parameters": len(parameters),
            "dtensor": sum(isinstance(param, DTensor) for param in parameters),
            # ZeRO-3 leaves an empty local tensor in a partitioned parameter and keeps its shape in ds_shape
            "zero3_partitioned": sum(hasattr(param, "ds_id") and param.numel() == 0 for param in parameters),
            "trainable_dtypes": sorted({str(p.dtype) for p in parameters if p.requires_grad}),
        }
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{self.process_index}.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    return prepared


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _init_with_engine
    Accelerator.prepare = _prepare_and_report
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
