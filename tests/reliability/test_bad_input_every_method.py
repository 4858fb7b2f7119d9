"""Bad input, across every hf_vpt method, is refused with an error that names the problem and the fix, and leaves
the model exactly as it was (issue 7).

One table, `CASES`: each row builds a scenario (the model that must not change, the call that must fail, and
optionally a probe whose output must be the same before and after), the exception type, and the words the message
must contain: some that name the problem and some that name the fix. `tests/reliability/test_bad_input.py` holds
the first, VPT-only cases; nothing here repeats them.

"Unchanged" means: the same modules (names and types), the same instance attributes on every module, the same
number of hooks of every kind on every module, the same parameters and buffers (non-persistent ones included) with
the same values, dtypes, devices and `requires_grad`, the same adapters, active adapters and tuner bookkeeping, and
no half-finished forward state. A failure while wrapping a bare model (`get_peft_model`,
`PeftModel.from_pretrained`) must also leave it without a `peft_config` attribute, hooks or patched `forward`s.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import hf_vpt
from hf_vpt.testing_utils import build, imagegpt_ids, pixels, tiny_clip_text, tiny_imagegpt


METHODS = ("vpt", "gated", "apt", "generative")
CLASSES = 4  # classes of the generative adapters
N_POSITIONS = 16  # ImageGPT positions
SOS = 16  # ImageGPT start-of-sequence token (vocab_size - 1)
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the APT folder whose config says VISUAL_PROMPT: PEFT warns about the APT fields before hf_vpt refuses the folder
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments .* for class VisualPromptConfig"),
]


# ---------------------------------------------------------------------------------------------------------------
# tiny models (no network)
# ---------------------------------------------------------------------------------------------------------------
def _vit(hidden: int = 32, layers: int = 3) -> nn.Module:
    return build("vit", hidden_size=hidden, num_hidden_layers=layers)


def _imagegpt(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return tiny_imagegpt(codebook_size=SOS, n_positions=N_POSITIONS, n_embd=width).eval()


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return transformers.BertModel(config).eval()


def _clip_text() -> nn.Module:
    return tiny_clip_text(num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=1).eval()


def _image_ids(batch: int = 2, length: int = N_POSITIONS) -> torch.Tensor:
    return imagegpt_ids(batch, length, codebook_size=SOS)


def _config(method: str, **kwargs):
    if method == "vpt":
        return hf_vpt.VisualPromptConfig(**{"num_prompt_tokens": 4, **kwargs})
    if method == "gated":
        return hf_vpt.GatedPromptConfig(**{"num_prompt_tokens": 4, **kwargs})
    if method == "apt":
        return hf_vpt.ApproxPromptConfig(**{"num_prompt_tokens": 4, **kwargs})
    # no prompt dropout: a new adapter's modules start in training mode (as in PEFT), and the probes compare outputs
    return hf_vpt.GenerativePromptConfig(
        **{"num_prompt_tokens": 3, "num_classes": CLASSES, "prompt_dropout": 0.0, **kwargs}
    )


def _base_for(method: str) -> nn.Module:
    return _imagegpt() if method == "generative" else _vit()


def _forward(method: str, model: nn.Module, **kwargs):
    if method == "generative":
        kwargs.setdefault("class_labels", torch.tensor([0, 3]))
        return model(input_ids=_image_ids(), **kwargs).logits
    return model(pixel_values=pixels(3), **kwargs).logits


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter folder per method, each on its own tiny base model."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for method in METHODS:
        model = get_peft_model(_base_for(method), _config(method))
        with torch.no_grad():  # non-trivial values, so that a silent half-load would show
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1)
        model.save_pretrained(root / method)
        folders[method] = root / method
    return folders


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    target: nn.Module | None  # what must be left unchanged (None for pure config errors)
    action: Callable[[], object]  # must raise
    probe: Callable[[], torch.Tensor] | None = None  # same output before and after the failure
    bare: bool = False  # `target` is a bare base model that a failed wrapping must leave bare


@dataclass
class Env:
    tmp_path: Path
    adapters: dict[str, Path]

    def copy(self, method: str) -> Path:
        folder = self.tmp_path / f"{method}_copy"
        shutil.copytree(self.adapters[method], folder)
        return folder


@dataclass(frozen=True)
class Case:
    name: str
    methods: tuple[str, ...]
    setup: Callable[[Env], Scenario]
    problem: tuple[str, ...]  # words that name what is wrong
    fix: tuple[str, ...]  # words that name what to do
    error: type[BaseException] = ValueError
    origin: str = "hf_vpt"  # "transformers" / "peft": the message is theirs, hf_vpt only passes it on


CASES: list[Case] = []


def case(name, methods, problem, fix, error=ValueError, origin="hf_vpt"):
    """Register the decorated scenario builder as a row of `CASES`."""

    def register(setup):
        CASES.append(Case(name, tuple(methods), setup, tuple(problem), tuple(fix), error, origin))
        return setup

    return register


def config_case(name, method, kwargs, problem, fix):
    CASES.append(Case(name, (method,), lambda env: Scenario(None, lambda: _config(method, **kwargs)), problem, fix))


# ---- 1. impossible config values, per method (tests/reliability/test_bad_input.py: the plain VPT range checks) ----
config_case(
    "vpt_bool_prompt_count", "vpt", {"num_prompt_tokens": True}, ["`num_prompt_tokens`", "True"], ["positive integer"]
)
config_case("vpt_string_dropout", "vpt", {"prompt_dropout": "0.1"}, ["`prompt_dropout`", "'0.1'"], ["[0, 1)"])
config_case(
    "vpt_string_projection",
    "vpt",
    {"prompt_projection_dim": "8"},
    ["`prompt_projection_dim`", "'8'"],
    ["positive integer"],
)
config_case("vpt_kv_prefix_not_bool", "vpt", {"kv_prefix": "no"}, ["`kv_prefix`", "'no'"], ["True or False"])
config_case(
    "gated_keep_prompts_not_bool",
    "gated",
    {"keep_prompts_in_outputs": "no"},
    ["`keep_prompts_in_outputs`", "'no'"],
    ["True or False"],
)
config_case(
    "gated_deep",
    "gated",
    {"depth": "deep"},
    ["shallow prompts only", "depth='deep'"],
    ["VisualPromptConfig(depth='deep')"],
)
config_case(
    "gated_temperature_range",
    "gated",
    {"min_temperature": 5.0, "max_temperature": 1.0},
    ["`min_temperature` (5.0)", "`max_temperature` (1.0)"],
    ["must not exceed", "[0.01, 10]"],
)
config_case(
    "gated_infinite_gate_init",
    "gated",
    {"gate_init": float("inf")},
    ["`gate_init`", "inf"],
    ["finite number", "default is 10"],
)
config_case("apt_zero_rank", "apt", {"rank": 0}, ["`rank`", "got 0"], ["positive integer", "uses 4"])
config_case("apt_unknown_attention", "apt", {"attentions": ["mlp"]}, ["`attentions`", "'mlp'"], ["('self', 'cross')"])
config_case(
    "apt_keep_prompts",
    "apt",
    {"keep_prompts_in_outputs": True},
    ["no prompt tokens"],
    ["keep_prompts_in_outputs=False"],
)
config_case(
    "generative_zero_classes",
    "generative",
    {"num_classes": 0},
    ["`num_classes`", "got 0"],
    ["positive integer", "None for an unconditional"],
)
config_case(
    "generative_towers_set",
    "generative",
    {"towers": ["vision"]},
    ["one image-token transformer"],
    ["leave `towers` unset"],
)
config_case(
    "generative_bool_prompt_count",
    "generative",
    {"num_prompt_tokens": True},
    ["`num_prompt_tokens`", "True"],
    ["positive integer"],
)
config_case(
    "generative_nan_dropout", "generative", {"prompt_dropout": float("nan")}, ["`prompt_dropout`", "nan"], ["[0, 1)"]
)


# ---- 2. unsupported architectures -------------------------------------------------------------------------------
def _wrap_bare(model, config) -> Scenario:
    return Scenario(model, lambda: get_peft_model(model, config), bare=True)


for _method in ("gated", "apt"):
    case(
        f"{_method}_on_bert",
        [_method],
        ["BertModel", "no architecture that this method can prompt"],
        ["supports", "ViT"],
    )(lambda env, m=_method: _wrap_bare(_bert(), _config(m)))
case(
    "generative_on_bert",
    ["generative"],
    ["BertModel", "no generative image transformer"],
    ["UVit2DModel", "ImageGPTModel"],
)(lambda env: _wrap_bare(_bert(), _config("generative")))
for _method in METHODS:
    case(f"{_method}_on_plain_module", [_method], ["Sequential", "contains no"], ["supports"])(
        lambda env, m=_method: _wrap_bare(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), _config(m))
    )
case("gated_on_text_tower", ["gated"], ["CLIPTextModel", "text tower"], ["vision towers only"])(
    lambda env: _wrap_bare(_clip_text(), _config("gated"))
)
case("vpt_on_generative_model", ["vpt"], ["ImageGPTForCausalImageModeling", "no architecture"], ["supports", "ViT"])(
    lambda env: _wrap_bare(_imagegpt(), _config("vpt"))
)
case(
    "generative_on_encoder",
    ["generative"],
    ["ViTForImageClassification", "no generative image transformer"],
    ["ImageGPTModel"],
)(lambda env: _wrap_bare(_vit(), _config("generative")))
case("apt_layers_past_depth", ["apt"], ["`layers=[5]`", "3 blocks"], ["indices 0..2"])(
    lambda env: _wrap_bare(_vit(), _config("apt", layers=[5]))
)
case("apt_cross_attention_on_vit", ["apt"], ["cross-attention", "self-attention only"], ["attentions=['self']"])(
    lambda env: _wrap_bare(_vit(), _config("apt", attentions=["cross"]))
)
case("apt_tower_the_model_lacks", ["apt"], ["`towers=['multimodal']`", "['text', 'vision']"], ["Change `towers`"])(
    lambda env: _wrap_bare(build("clip"), _config("apt", towers=["multimodal"]))
)


# ---- 3. adapters loaded onto the wrong base ----------------------------------------------------------------------
def _load_bare(model, folder, **kwargs) -> Scenario:
    return Scenario(model, lambda: PeftModel.from_pretrained(model, folder, **kwargs), bare=True)


TRAINED_FOR = ["Load it onto the base model it was trained on"]
case(
    "apt_adapter_on_wider_model", ["apt"], ["hidden size 32", "hidden size 48"], TRAINED_FOR, hf_vpt.AdapterLoadError
)(lambda env: _load_bare(_vit(hidden=48), env.adapters["apt"]))
case("gated_adapter_on_deeper_model", ["gated"], ["3 blocks", "5 blocks"], TRAINED_FOR, hf_vpt.AdapterLoadError)(
    lambda env: _load_bare(_vit(layers=5), env.adapters["gated"])
)
case(
    "generative_adapter_on_wider_model",
    ["generative"],
    ["generative tower", "hidden size 48"],
    TRAINED_FOR,
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_imagegpt(width=48), env.adapters["generative"]))
case(
    "generative_adapter_on_encoder",
    ["generative"],
    ["ViTForImageClassification", "no generative image transformer"],
    ["ImageGPTModel"],
)(lambda env: _load_bare(_vit(), env.adapters["generative"]))


@case(
    "apt_folder_whose_config_says_visual_prompt",
    ["apt", "vpt"],
    ["approx_prompt adapter", "'VISUAL_PROMPT'"],
    ["restore the adapter_config.json"],
    hf_vpt.AdapterLoadError,
)
def _(env):
    folder = env.copy("apt")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "VISUAL_PROMPT"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return _load_bare(_vit(), folder)


@case(
    "gated_adapter_into_vpt_model",
    ["gated", "vpt"],
    ["different peft types", "VISUAL_PROMPT", "GATED_PROMPT"],
    [],
    origin="peft",
)
def _(env):
    model = get_peft_model(_vit(), _config("vpt"))
    return Scenario(
        model, lambda: model.load_adapter(env.adapters["gated"], adapter_name="second"), lambda: _forward("vpt", model)
    )


@case("apt_second_adapter_for_wider_model", ["apt"], ["hidden size 48"], TRAINED_FOR, hf_vpt.AdapterLoadError)
def _(env):
    model = PeftModel.from_pretrained(_vit(), env.adapters["apt"])
    wide = get_peft_model(_vit(hidden=48), _config("apt"))
    wide.save_pretrained(env.tmp_path / "wide")
    return Scenario(
        model, lambda: model.load_adapter(env.tmp_path / "wide", adapter_name="wide"), lambda: _forward("apt", model)
    )


@case(
    "vpt_second_adapter_for_other_tower",
    ["vpt"],
    ["asks for towers ['text']", "prompt ['vision']"],
    ["must prompt the same towers"],
)
def _(env):
    model = get_peft_model(build("clip"), _config("vpt"))
    inputs = {"pixel_values": pixels(2), "input_ids": torch.ones(2, 5, dtype=torch.long)}
    return Scenario(
        model,
        lambda: model.add_adapter("text", _config("vpt", towers=["text"])),
        lambda: model(**inputs).logits_per_image,
    )


@case("apt_second_adapter_past_depth", ["apt"], ["`layers=[7]`", "3 blocks"], ["indices 0..2"])
def _(env):
    model = get_peft_model(_vit(), _config("apt"))
    return Scenario(
        model, lambda: model.add_adapter("late", _config("apt", layers=[7])), lambda: _forward("apt", model)
    )


# ---- 4. broken adapter files -------------------------------------------------------------------------------------
UNREADABLE_FIX = ["truncated or corrupted", "save or download the adapter again"]


def _rewrite_weights(env, method, edit) -> Path:
    folder = env.copy(method)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(edit(path.read_bytes()))
    return folder


case(
    "gated_file_with_garbage_header",
    ["gated"],
    ["not a readable safetensors file", "invalid JSON"],
    UNREADABLE_FIX,
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_vit(), _rewrite_weights(env, "gated", lambda b: b[:8] + b"#" * 32 + b[40:])))
case(
    "apt_file_with_absurd_header_length",
    ["apt"],
    ["not a readable safetensors file", "header too large"],
    UNREADABLE_FIX,
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_vit(), _rewrite_weights(env, "apt", lambda b: (2**40).to_bytes(8, "little") + b[8:])))
case(
    "generative_file_cut_in_the_data",
    ["generative"],
    ["not a readable safetensors file", "not fully covered"],
    UNREADABLE_FIX,
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_imagegpt(), _rewrite_weights(env, "generative", lambda b: b[:-7])))
case(
    "vpt_empty_file",
    ["vpt"],
    ["not a readable safetensors file", "header too small"],
    UNREADABLE_FIX,
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_vit(), _rewrite_weights(env, "vpt", lambda b: b"")))


def _retype(env, method, key_part, dtype) -> Path:
    folder = env.copy(method)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if key_part in k)
    tensors[key] = (tensors[key] * 100).to(dtype)
    save_file(tensors, path)
    return folder


case(
    "vpt_prompts_stored_as_integers",
    ["vpt"],
    ["non-floating-point dtype", "I64"],
    ["save the adapter again"],
    hf_vpt.AdapterLoadError,
)(lambda env: _load_bare(_vit(), _retype(env, "vpt", "embeddings", torch.int64)))


@case(
    "gated_boolean_tensor_with_config_given",
    ["gated"],
    ["non-floating-point dtype", "torch.bool"],
    ["save the adapter again"],
    hf_vpt.AdapterLoadError,
)
def _(env):
    # `config=` skips the file check of `from_pretrained`; the weights are checked again while loading.
    config = hf_vpt.GatedPromptConfig.from_pretrained(env.adapters["gated"])
    return _load_bare(_vit(), _retype(env, "gated", "gate_logits", torch.bool), config=config)


def _pickle_only(env, method) -> Path:
    folder = env.copy(method)
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    return folder


for _method in ("gated", "apt", "generative"):
    case(
        f"{_method}_pickle_only_folder",
        [_method],
        ["only a pickle file", "adapter_model.bin"],
        ["safetensors.torch.save_file"],
        hf_vpt.AdapterLoadError,
    )(lambda env, m=_method: _load_bare(_base_for(m), _pickle_only(env, m)))


@case(
    "apt_folder_without_weights",
    ["apt"],
    ["has no adapter_model.safetensors"],
    ["save the adapter again"],
    hf_vpt.AdapterLoadError,
)
def _(env):
    folder = env.copy("apt")
    (folder / "adapter_model.safetensors").unlink()
    return _load_bare(_vit(), folder)


# ---- 5. sequences past a model's position limit ------------------------------------------------------------------
@case(
    "clip_text_past_max_positions",
    ["vpt"],
    ["Sequence length", "max_position_embeddings: 16"],
    ["must be less than"],
    origin="transformers",
)
def _(env):
    # The 4 text prompts do not count against the 16 positions (16 tokens work, see the probe); 17 tokens do not.
    model = get_peft_model(build("clip"), _config("vpt", towers=["text"]))
    images = pixels(2)

    def run(length):
        return model(input_ids=torch.ones(2, length, dtype=torch.long), pixel_values=images).logits_per_image

    return Scenario(model, lambda: run(17), lambda: run(16))


@case(
    "imagegpt_past_n_positions",
    ["generative"],
    ["16 positions (`n_positions`)", "17 new ones"],
    ["must fit in 16 tokens", "prompts do not count"],
)
def _(env):
    model = get_peft_model(_imagegpt(), _config("generative"))
    labels = torch.tensor([0, 1])
    return Scenario(
        model,
        lambda: model(input_ids=_image_ids(length=N_POSITIONS + 1), class_labels=labels),
        lambda: _forward("generative", model),
    )


# ---- 6. class labels the generator cannot take -------------------------------------------------------------------
def _labels_case(labels) -> Callable[[Env], Scenario]:
    def setup(env):
        model = get_peft_model(_imagegpt(), _config("generative"))
        kwargs = {} if labels is None else {"class_labels": labels}
        return Scenario(model, lambda: model(input_ids=_image_ids(), **kwargs), lambda: _forward("generative", model))

    return setup


case(
    "class_label_past_num_classes", ["generative"], ["got values in [0, 4]", "num_classes=4"], ["must lie in [0, 3]"]
)(_labels_case(torch.tensor([0, 4])))
case("negative_class_label", ["generative"], ["got values in [-1, 0]"], ["must lie in [0, 3]"])(
    _labels_case(torch.tensor([0, -1]))
)
case("float_class_labels", ["generative"], ["torch.float32"], ["1-D integer tensor", "one label per sample"])(
    _labels_case(torch.tensor([0.0, 1.0]))
)
case("missing_class_labels", ["generative"], ["class-conditional", "num_classes=4"], ["class_labels=labels"])(
    _labels_case(None)
)
case("one_class_label_too_many", ["generative"], ["shape (3,)", "2 samples"], ["one class label per sample"])(
    _labels_case(torch.tensor([0, 1, 2]))
)


# ---- 7. wrong types, devices and adapter selections --------------------------------------------------------------
def _two_adapters(method, **second) -> nn.Module:
    model = get_peft_model(_base_for(method), _config(method))
    model.add_adapter("other", _config(method, **second))
    return model


def _routing_case(method, names, **second) -> Callable[[Env], Scenario]:
    def setup(env):
        model = _two_adapters(method, **second)
        return Scenario(model, lambda: _forward(method, model, adapter_names=names), lambda: _forward(method, model))

    return setup


NAMES_FIX = ["list of adapter names, one per sample"]
case("adapter_names_as_a_string", ["vpt"], ["`adapter_names`"], NAMES_FIX, TypeError)(_routing_case("vpt", "other"))
case("adapter_names_as_integers", ["gated"], ["`adapter_names`"], NAMES_FIX, TypeError)(
    _routing_case("gated", [0, 1, 0])
)
case("adapter_names_too_short", ["apt"], ["2 entries", "3 samples"], ["one adapter name per sample"])(
    _routing_case("apt", ["default", "other"])
)
case("adapter_names_unknown", ["generative"], ["unknown adapters ['missing']"], ["available: ['default', 'other']"])(
    _routing_case("generative", ["default", "missing"])
)
case(
    "adapter_names_mixing_prompt_lengths",
    ["vpt"],
    ["same number of prompt tokens", "'other': 2"],
    ["Split the batch by prompt length"],
)(_routing_case("vpt", ["default", "other", "default"], num_prompt_tokens=2))


@case("two_active_apt_adapters", ["apt"], ["2 APT adapters are active"], ["set_adapter(name)", "adapter_names=[...]"])
def _(env):
    model = _two_adapters("apt")
    model.base_model.set_adapter(["default", "other"])
    return Scenario(model, lambda: _forward("apt", model))


def _meta_case(method) -> Callable[[Env], Scenario]:
    def setup(env):
        # `low_cpu_mem_usage=True` creates the adapter on the meta device, to be filled by a later load
        model = get_peft_model(_base_for(method), _config(method), low_cpu_mem_usage=True)
        return Scenario(model, lambda: _forward(method, model))

    return setup


for _method in METHODS:
    case(
        f"{_method}_prompts_on_meta_device",
        [_method],
        ["meta device", "never loaded"],
        ["load_adapter", "low_cpu_mem_usage"],
    )(_meta_case(_method))


@case("merge_vpt_prompts", ["vpt"], ["no weight delta"], ["unload()"])
def _(env):
    model = get_peft_model(_vit(), _config("vpt"))
    return Scenario(model, model.merge_and_unload, lambda: _forward("vpt", model))


@case("merge_apt_prompts", ["apt"], ["non-linear term", "no weight delta"], ["unload()"])
def _(env):
    model = get_peft_model(_vit(), _config("apt"))
    return Scenario(model, lambda: model.base_model.merge_adapter(), lambda: _forward("apt", model))


# ---------------------------------------------------------------------------------------------------------------
# what "unchanged" means
# ---------------------------------------------------------------------------------------------------------------
def _hook_count(module: nn.Module) -> int:
    return sum(len(getattr(module, name, {})) for name in HOOK_DICTS)


def _snapshot(model: nn.Module) -> dict:
    tensors = {}
    for name, value in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        data = value.detach()
        tensors[name] = (data.clone(), value.requires_grad if isinstance(value, nn.Parameter) else None)
    state = {
        "modules": [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": {name: _hook_count(m) for name, m in model.named_modules()},
        "patched_forward": sorted(name for name, m in model.named_modules() if "forward" in vars(m)),
        "training": {name: m.training for name, m in model.named_modules()},
        "tensors": tensors,
        "has_peft_config": hasattr(model, "peft_config"),
    }
    tuner = getattr(model, "base_model", None)
    if isinstance(model, PeftModel):
        state["peft"] = {
            "adapters": sorted(model.peft_config),
            "active": list(tuner.active_adapters),
            "banks": sorted(tuner.banks),
            "block_positions": dict(tuner._block_positions),
            "towers": [id(t.root) for t in tuner._towers],
            "hook_handles": len(tuner._hook_handles),
        }
    return state


def _transient_state(model: nn.Module) -> dict:
    """Per-forward state on the tuner; empty between forwards, also after a forward that failed."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(model, PeftModel):
        return {}
    return {
        "forward_states": dict(tuner._forward_states),
        "batch_adapter_names": tuner._batch_adapter_names,
        "class_labels": getattr(tuner, "_class_labels", None),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in before:
        if key == "tensors":
            continue
        assert after[key] == before[key], f"{key} changed"
    assert sorted(after["tensors"]) == sorted(before["tensors"]), "parameters or buffers were added or removed"
    for name, (old, old_grad) in before["tensors"].items():
        new, new_grad = after["tensors"][name]
        assert (new.dtype, new.device, new.shape, new_grad) == (old.dtype, old.device, old.shape, old_grad), name
        if not old.is_meta:
            assert torch.equal(new, old), f"{name} changed value"


def test_the_table_covers_every_method_and_many_kinds():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)
    covered = {method for c in CASES for method in c.methods}
    assert covered == set(METHODS)
    for c in CASES:
        assert c.problem, c.name
        assert c.fix or c.origin != "hf_vpt", f"{c.name}: an hf_vpt message must name the fix"


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(bad: Case, saved_adapters, tmp_path):
    scenario = bad.setup(Env(tmp_path, saved_adapters))
    target = scenario.target
    expected = scenario.probe() if scenario.probe is not None else None
    before = _snapshot(target) if target is not None else None
    if scenario.bare:
        assert not before["has_peft_config"] and not any(before["hooks"].values())

    with pytest.raises(bad.error) as raised:
        scenario.action()

    message = " ".join(str(raised.value).split())
    for words in (*bad.problem, *bad.fix):
        assert words.lower() in message.lower(), f"{words!r} missing from the message: {message}"
    if target is None:
        return
    _assert_same(before, _snapshot(target))
    assert not any(_transient_state(target).values()), _transient_state(target)
    if scenario.bare:
        assert not hasattr(target, "peft_config")
    if expected is not None:
        assert torch.equal(scenario.probe(), expected), "the model computes something else after the failure"
