"""Prompt tuning of a diffusers pipeline's CLIP text encoder (Stable Diffusion 1.x/2.x, and SDXL's two encoders).

diffusers' own adapter entry points (`load_lora_weights`, `ModelMixin.add_adapter`) are LoRA/injection-only, so an
hf_vpt adapter is put on the text encoder the plain PEFT way: `pipe.text_encoder` is replaced by a `PeftModel` that
wraps it. Nothing else in the pipeline changes (UNet, VAE, scheduler and tokenizer are the same objects, and the
pipeline's config still records `CLIPTextModel`, because diffusers unwraps `PeftModel`s when it registers
components). `StableDiffusionPipeline.encode_prompt` then works unchanged: it reads `text_encoder.config` and
`.dtype` (forwarded to the CLIP model), calls it with `input_ids`, optionally an `attention_mask` and
`output_hidden_states=True`, and the prompt positions are removed from every output it reads.

    >>> import hf_vpt
    >>> pipe = StableDiffusionPipeline.from_pretrained(...)
    >>> hf_vpt.attach_text_encoder_adapter(pipe, hf_vpt.VisualPromptConfig(num_prompt_tokens=8, depth="deep"))
    >>> ...  # train pipe.text_encoder's prompts (the only trainable parameters of the text encoder)
    >>> hf_vpt.save_text_encoder_adapter(pipe, "my-prompts")
    >>> hf_vpt.load_text_encoder_adapter(fresh_pipe, "my-prompts")  # later, on an untouched pipeline
    >>> with fresh_pipe.text_encoder.disable_adapter():  # temporarily the original encoder
    ...     image = fresh_pipe("a photo of a cat").images[0]
    >>> hf_vpt.detach_text_encoder_adapter(fresh_pipe)  # the original encoder, permanently

A LoRA scale (`cross_attention_kwargs={"scale": s}`) reaches the text encoder's tuner layers too; prompts ignore
it, and UNet LoRAs loaded with `pipe.load_lora_weights` work next to a prompt-tuned text encoder. Known limits:
`pipe.save_pretrained` only warns that it "cannot save" a wrapped text encoder and writes a pipeline folder without
`text_encoder/` (save the adapter with `save_text_encoder_adapter`, or detach first); LoRA on the wrapped text
encoder itself is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

from .core.config import PromptConfigBase


TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")
# Keyword arguments of `PeftModel.from_pretrained` that say where the adapter files are.
_LOCATION_KWARGS = ("subfolder", "revision", "cache_dir", "token", "force_download", "local_files_only")
# Where `attach`/`load` keep what `detach` needs to restore: trainability and train/eval mode of the original encoder.
_STATE_ATTRIBUTE = "_hf_vpt_text_encoder_state"


@dataclass(frozen=True)
class _EncoderState:
    requires_grad: dict[str, bool]
    training: dict[str, bool]

    @classmethod
    def capture(cls, encoder: nn.Module) -> _EncoderState:
        return cls(
            requires_grad={name: p.requires_grad for name, p in encoder.named_parameters()},
            training={name: m.training for name, m in encoder.named_modules()},
        )

    def restore(self, encoder: nn.Module) -> None:
        for name, param in encoder.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, param.requires_grad))
        for name, module in encoder.named_modules():
            module.training = self.training.get(name, module.training)  # per module: `train()` would recurse


def attach_text_encoder_adapter(
    pipe, config: PromptConfigBase, adapter_name: str = "default", *, component: str = "text_encoder"
) -> PeftModel:
    """Wrap `pipe.<component>` (a CLIP text encoder) with a new hf_vpt adapter and return the `PeftModel`.

    Args:
        pipe: A diffusers pipeline with a CLIP text encoder, e.g. `StableDiffusionPipeline`.
        config: An hf_vpt config that supports CLIP's text tower: `ApproxPromptConfig` or
            `VisualPromptConfig` (`depth="deep"` or `"shallow"`). Prompts go right after the BOS token.
        adapter_name: Name of the adapter inside the `PeftModel`.
        component: `"text_encoder"`, or `"text_encoder_2"` for SDXL's second encoder.

    Only the adapter's parameters are trainable afterwards; the encoder's weights are frozen (and restored with
    their original `requires_grad` by `detach_text_encoder_adapter`).
    """
    if not isinstance(config, PromptConfigBase):
        raise TypeError(
            f"`config` must be an hf_vpt config (e.g. `hf_vpt.VisualPromptConfig` or `hf_vpt.ApproxPromptConfig`); got "
            f"{type(config).__name__}. For LoRA on a diffusers text encoder use diffusers' `pipe.load_lora_weights`."
        )
    encoder = _bare_text_encoder(pipe, component)
    state = _EncoderState.capture(encoder)
    model = get_peft_model(encoder, config, adapter_name=adapter_name)
    return _install(pipe, component, model, state)


def load_text_encoder_adapter(
    pipe,
    path_or_repo: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    component: str = "text_encoder",
    **kwargs,
) -> PeftModel:
    """Load an hf_vpt adapter saved with `save_text_encoder_adapter` onto `pipe.<component>` and return the
    `PeftModel` that now is `pipe.<component>`.

    `path_or_repo` is a local folder or a Hub repo id; `kwargs` go to `PeftModel.from_pretrained` (`subfolder`,
    `revision`, `token`, ...). The adapter's recorded tower shapes are checked against the encoder before anything
    changes. With `is_trainable=False` (default) the adapter is frozen, for inference.
    """
    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
    config = PeftConfig.from_pretrained(path_or_repo, **location)
    if not isinstance(config, PromptConfigBase):
        raise TypeError(
            f"'{path_or_repo}' holds a {type(config).__name__} adapter, not an hf_vpt one. For LoRA on a diffusers "
            "text encoder use diffusers' `pipe.load_lora_weights`."
        )
    encoder = _bare_text_encoder(pipe, component)
    state = _EncoderState.capture(encoder)
    model = PeftModel.from_pretrained(
        encoder, path_or_repo, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
    )
    return _install(pipe, component, model, state)


def save_text_encoder_adapter(pipe, path: str, *, component: str = "text_encoder", **kwargs) -> None:
    """Save the text-encoder adapter(s) of `pipe` to `path`: `adapter_config.json`, `adapter_model.safetensors` and
    a `README.md` model card; nothing of the pipeline itself. `kwargs` go to `PeftModel.save_pretrained` (e.g.
    `selected_adapters`; adapters other than "default" are written to subfolders named after them, as in PEFT)."""
    _wrapped_text_encoder(pipe, component).save_pretrained(path, **kwargs)


def detach_text_encoder_adapter(pipe, *, component: str = "text_encoder") -> nn.Module:
    """Remove every adapter from `pipe.<component>` and put the original text encoder back; returns it.

    The restored encoder is the same object that was wrapped, with bit-identical weights, its own modules (the
    wrappers and hooks are gone) and its original `requires_grad` flags and train/eval mode. The `PeftModel` is
    unusable afterwards. For a temporary switch use `with pipe.text_encoder.disable_adapter(): ...` instead.
    """
    model = _wrapped_text_encoder(pipe, component)
    state = getattr(model, _STATE_ATTRIBUTE, None)
    encoder = model.unload()
    if state is not None:
        state.restore(encoder)
    setattr(pipe, component, encoder)
    return encoder


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _clip_text_classes() -> tuple[type, ...]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModel, CLIPTextModelWithProjection


def _component(pipe, component: str):
    if component not in TEXT_ENCODER_COMPONENTS:
        raise ValueError(f"`component` must be one of {TEXT_ENCODER_COMPONENTS}; got {component!r}.")
    if not hasattr(pipe, component):
        raise ValueError(
            f"{type(pipe).__name__} has no `{component}`; hf_vpt's text-encoder helpers need a pipeline with a CLIP "
            "text encoder, such as `StableDiffusionPipeline`."
        )
    encoder = getattr(pipe, component)
    if encoder is None:
        raise ValueError(
            f"`pipe.{component}` is None (the pipeline was loaded without it); load the pipeline with its text encoder."
        )
    return encoder


def _bare_text_encoder(pipe, component: str) -> nn.Module:
    """`pipe.<component>`, checked to be an unwrapped CLIP text encoder."""
    encoder = _component(pipe, component)
    if isinstance(encoder, PeftModel):
        raise ValueError(
            f"`pipe.{component}` already carries adapter(s) {sorted(encoder.peft_config)}. Add another one with "
            f"`pipe.{component}.add_adapter(name, config)` or `pipe.{component}.load_adapter(path, name)` and switch "
            f"with `pipe.{component}.set_adapter(name)`, or call `detach_text_encoder_adapter(pipe)` first."
        )
    if not isinstance(encoder, _clip_text_classes()):
        raise TypeError(
            f"`pipe.{component}` is a {type(encoder).__name__}, not a CLIP text encoder (`CLIPTextModel` or "
            "`CLIPTextModelWithProjection`); hf_vpt's text-encoder helpers only prompt CLIP text towers."
        )
    return encoder


def _wrapped_text_encoder(pipe, component: str) -> PeftModel:
    encoder = _component(pipe, component)
    if not isinstance(encoder, PeftModel):
        raise ValueError(
            f"`pipe.{component}` carries no adapter; attach one with `attach_text_encoder_adapter` or "
            "`load_text_encoder_adapter` first."
        )
    return encoder


def _install(pipe, component: str, model: PeftModel, state: _EncoderState) -> PeftModel:
    object.__setattr__(model, _STATE_ATTRIBUTE, state)  # plain attribute: not a module, not in any state dict
    setattr(pipe, component, model)
    return model
