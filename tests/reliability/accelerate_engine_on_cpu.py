"""Run a recipe under `accelerate launch` with the launcher's FSDP or DeepSpeed engine applied on CPU processes.

accelerate applies FSDP and DeepSpeed on accelerators only: on CPU processes `AcceleratorState` keeps `MULTI_CPU`
and the launch silently runs DDP. Both engines themselves run on CPU (torch's `fully_shard` and DeepSpeed's CPU
accelerator over gloo; `test_sharded.py` drives them directly), so this shim lets CI drive them through accelerate's
own code, the path a user's `accelerate launch --config_file fsdp.yaml recipes/...` takes on GPUs: `prepare`
(`fully_shard` per block and root, or `deepspeed.initialize`), gradient clipping, `get_state_dict`, `save_state` and
`load_state`. It changes two things: after accelerate has set its state up from the launcher's environment, the
engine the launcher asked for replaces `MULTI_CPU`, with the plugin accelerate built for it, as `AcceleratorState`
does on a GPU; and ZeRO-3 partitions every tensor, however small (see `_apply_engine`).

    python -m accelerate.commands.launch --config_file recipes/accelerate_fsdp2.yaml ... \\
        tests/reliability/accelerate_engine_on_cpu.py recipes/image_classification.py <recipe options>
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType


def _asked(flag: str) -> bool:
    return os.environ.get(flag, "false").lower() == "true"


def _apply_engine(accelerator_state, kwargs: dict) -> None:
    if accelerator_state.distributed_type != DistributedType.MULTI_CPU:
        return
    if _asked("ACCELERATE_USE_FSDP") and kwargs.get("fsdp_plugin") is not None:
        accelerator_state.fsdp_plugin = kwargs["fsdp_plugin"]
        engine = DistributedType.FSDP
    elif _asked("ACCELERATE_USE_DEEPSPEED") and kwargs.get("deepspeed_plugin") is not None:
        plugins = kwargs["deepspeed_plugin"]
        for plugin in plugins.values() if isinstance(plugins, dict) else [plugins]:
            plugin.set_mixed_precision(accelerator_state._mixed_precision)
            # ZeRO-3 keeps tensors under 1e5 elements whole on every rank; the tiny test models' prompts would never
            # be partitioned, unlike those of a real backbone (VPT-deep on ViT-B: 12 x 50 x 768). Partition all.
            zero = plugin.deepspeed_config.get("zero_optimization", {})
            if zero.get("stage") == 3:
                zero["stage3_param_persistence_threshold"] = 0
        first = next(iter(plugins.values())) if isinstance(plugins, dict) else plugins
        first.select(_from_accelerator_state=True)  # registers the config with transformers, as on a GPU
        accelerator_state.deepspeed_plugins = plugins
        accelerator_state._mixed_precision = "no"  # DeepSpeed handles precision through its own config
        engine = DistributedType.DEEPSPEED
    else:
        return
    # AcceleratorState copies PartialState's fields on every instantiation: set the engine in both.
    accelerator_state.distributed_type = engine
    state.PartialState._shared_state["distributed_type"] = engine


_accelerator_state_init = state.AcceleratorState.__init__


def _init_with_engine(self, *args, **kwargs):
    _accelerator_state_init(self, *args, **kwargs)
    _apply_engine(self, kwargs)


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _init_with_engine
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
