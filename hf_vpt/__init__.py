"""hf_vpt: vision prompt tuning methods for the Hugging Face stack, as PEFT methods.

Importing the package registers its methods with PEFT, so `get_peft_model`, `PeftConfig.from_pretrained` and
`PeftModel.from_pretrained` know them.
"""

from .core import adapter_io as _adapter_io
from .core.config import AdapterLoadError
from .diffusers_text_encoder import (
    attach_text_encoder_adapter,
    detach_text_encoder_adapter,
    load_text_encoder_adapter,
    save_text_encoder_adapter,
)
from .layouts import SUPPORTED_ARCHITECTURES, find_towers
from .tuners import *  # noqa: F403  (each method's public names: `hf_vpt.tuners.__all__`)
from .tuners import __all__ as _method_names


# After the methods: the baselines (linear probing, LoRA, full fine-tuning) complete the registry's training variants.
from . import baselines as _baselines  # noqa: E402, F401  isort: skip


__version__ = "0.1.0"

_adapter_io.install()  # safetensors-only, all-or-nothing adapter I/O through PEFT's entry points

# Submodules with heavy dependencies (the FID network, numpy/scipy statistics, samplers) load on first use, so that
# `import hf_vpt` stays as fast as registering the methods.
_LAZY_SUBMODULES = ("metrics", "sampling")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hf_vpt' has no attribute {name!r}")


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AdapterLoadError",
    "attach_text_encoder_adapter",
    "detach_text_encoder_adapter",
    "find_towers",
    "load_text_encoder_adapter",
    "save_text_encoder_adapter",
    *_method_names,
]
