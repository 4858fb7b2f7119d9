"""What hf_vpt knows about each supported architecture, in one place.

A *tower* is the module that embeds the input, runs an ordered list of transformer blocks and applies a final
norm: `ViTModel`, `CLIPVisionModel`, ... . Towers are recognised by class; inside a tower everything is found by
structure (the block list is the `ModuleList` of identical blocks whose length is `num_hidden_layers`, the final norm
is the first `LayerNorm` child after it), never by attribute paths, because transformers renames internals between
releases (`vit.encoder.layer.N.attention.attention.query` became `vit.layers.N.attention.q_proj` in 5.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .core.kv_prefix import find_attention_layout


@dataclass(frozen=True)
class ArchitectureSpec:
    """Static facts about one architecture family."""

    name: str
    root_classes: tuple[str, ...]
    kind: str  # "vision" or "text": which tower of a multi-tower model this is
    num_special_tokens: Callable[[object], int]  # leading tokens (CLS, distillation, registers) before the prompts
    check_config: Callable[[object], None] = lambda config: None
    # candidate child names of the attention projections, in the order tried
    query_names: tuple[str, ...] = ("q_proj", "query")
    key_names: tuple[str, ...] = ("k_proj", "key")
    value_names: tuple[str, ...] = ("v_proj", "value")
    output_names: tuple[str, ...] = ("o_proj", "out_proj")
    attention_norm_names: tuple[str, ...] = ("layernorm_before", "norm1", "layer_norm1")
    # the tower's self-attention is causal (CLIP text): inserted prompts become ordinary causal positions
    causal: bool = False


def _check_vit_mae(config) -> None:
    if getattr(config, "mask_ratio", 0.0) != 0.0:
        raise ValueError(
            f"ViTMAE drops {config.mask_ratio:.0%} of the patches at random (`mask_ratio={config.mask_ratio}`), so a "
            "prompt-tuned classifier would see a different subset of the image at every call. Load the encoder with "
            "all patches: `ViTMAEModel.from_pretrained(name, mask_ratio=0.0)`."
        )


SUPPORTED_ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("ViT", ("ViTModel",), "vision", lambda c: 1),
    ArchitectureSpec("DeiT", ("DeiTModel",), "vision", lambda c: 2),  # CLS + distillation token
    ArchitectureSpec("ViTMAE", ("ViTMAEModel",), "vision", lambda c: 1, check_config=_check_vit_mae),
    ArchitectureSpec("Dinov2", ("Dinov2Model",), "vision", lambda c: 1),
    ArchitectureSpec(
        "Dinov2 with registers",
        ("Dinov2WithRegistersModel",),
        "vision",
        lambda c: 1 + c.num_register_tokens,
    ),
    ArchitectureSpec("CLIP vision tower", ("CLIPVisionModel", "CLIPVisionTransformer"), "vision", lambda c: 1),
    ArchitectureSpec("SigLIP vision tower", ("SiglipVisionModel", "SiglipVisionTransformer"), "vision", lambda c: 0),
    # Prompts go right after the BOS token and are causal positions: every text token sees them, BOS does not.
    ArchitectureSpec("CLIP text tower", ("CLIPTextModel", "CLIPTextTransformer"), "text", lambda c: 1, causal=True),
    # No BOS/CLS token: prompts go first; the pooled (last) token is unaffected once they are removed.
    ArchitectureSpec("SigLIP text tower", ("SiglipTextModel", "SiglipTextTransformer"), "text", lambda c: 0),
    # One joint text+image encoder: sequence [text CLS, text, image CLS, patches]; prompts go after the text CLS.
    ArchitectureSpec("ViLT", ("ViltModel",), "multimodal", lambda c: 1),
)


def supported_architectures_message() -> str:
    names = ", ".join(spec.name for spec in SUPPORTED_ARCHITECTURES)
    return (
        f"hf_vpt supports these transformers architectures: {names} (and models that contain them, such as "
        "`ViTForImageClassification` or `CLIPModel`)."
    )


@dataclass
class Tower:
    """One prompted tower of a model, found by structure."""

    spec: ArchitectureSpec
    name: str  # module path of the tower root inside the model it was found in
    root: nn.Module
    blocks: nn.ModuleList
    block_names: list[str]
    final_norm: nn.Module | None
    hidden_size: int
    num_special_tokens: int
    patch_area: int  # patch_h * patch_w, used by VPT's initialisation
    config: object = field(repr=False)
    # per block, the parts the key/value-prefix path needs; None where a block's attention has another shape
    attention_layouts: list = field(default_factory=list, repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def supports_kv_prefix(self) -> bool:
        """Deep prompts can run as key/value prefixes (an attention of a known shape in every block)."""
        return bool(self.attention_layouts) and all(self.attention_layouts)

    def query_projection(self, block: nn.Module) -> nn.Linear:
        return _find_projection(block, self.spec.query_names, "query")


def _find_projection(block: nn.Module, names: tuple[str, ...], role: str) -> nn.Linear:
    for module_name, module in block.named_modules():
        if isinstance(module, nn.Linear) and module_name.rsplit(".", 1)[-1] in names:
            return module
    raise ValueError(f"Could not find the attention {role} projection in {type(block).__name__} (tried {names}).")


def _find_block_list(root: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = []
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len(module) > 0:
            first_type = type(module[0])
            if all(type(block) is first_type for block in module):
                candidates.append((name, module))
    if len(candidates) != 1:
        raise ValueError(
            f"Expected exactly one list of {num_layers} identical blocks in {type(root).__name__}, found "
            f"{len(candidates)}."
        )
    return candidates[0]


def _find_final_norm(root: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    seen_blocks = False
    for child in root.children():
        if child is blocks or any(module is blocks for module in child.modules()):
            seen_blocks = True
        elif seen_blocks and isinstance(child, nn.LayerNorm):
            return child
    return None


def _patch_area(config) -> int:
    patch = getattr(config, "patch_size", 16)
    if isinstance(patch, (tuple, list)):
        return int(patch[0]) * int(patch[1])
    return int(patch) * int(patch)


def _spec_for(module: nn.Module) -> ArchitectureSpec | None:
    class_name = type(module).__name__
    for spec in SUPPORTED_ARCHITECTURES:
        if class_name in spec.root_classes:
            return spec
    return None


def find_towers(model: nn.Module) -> list[Tower]:
    """All supported towers inside `model`, outermost first. Nested matches (a tower inside a tower) are skipped."""
    towers: list[Tower] = []
    for name, module in model.named_modules():
        spec = _spec_for(module)
        if spec is None or any(name.startswith(t.name + ".") for t in towers if t.name):
            continue
        config = module.config
        spec.check_config(config)
        block_list_name, blocks = _find_block_list(module, config.num_hidden_layers)
        prefix = f"{name}.{block_list_name}" if name else block_list_name
        towers.append(
            Tower(
                spec=spec,
                name=name,
                root=module,
                blocks=blocks,
                block_names=[f"{prefix}.{i}" for i in range(len(blocks))],
                final_norm=_find_final_norm(module, blocks),
                hidden_size=config.hidden_size,
                num_special_tokens=spec.num_special_tokens(config),
                patch_area=_patch_area(config),
                config=config,
                attention_layouts=[find_attention_layout(block, spec) for block in blocks],
            )
        )
    return towers


def select_towers(model: nn.Module, kinds: list[str] | None, supported_kinds: tuple[str, ...]) -> list[Tower]:
    """The towers a method prompts: those of the requested kinds, by default the vision towers if there are any."""
    found = find_towers(model)
    towers = [t for t in found if t.kind in supported_kinds]
    if not towers and found:
        raise ValueError(
            f"{type(model).__name__} has only {', '.join(f'a {t.kind} tower ({t.spec.name})' for t in found)}, but "
            f"this method prompts {' and '.join(supported_kinds)} towers only. Use a model with such a tower, or an "
            "hf_vpt method that supports this tower kind."
        )
    if not towers:
        raise ValueError(
            f"{type(model).__name__} contains no architecture that this method can prompt. "
            + supported_architectures_message()
        )
    if kinds is None:
        vision = [t for t in towers if t.kind == "vision"]
        towers = vision or towers
    else:
        missing = set(kinds) - {t.kind for t in towers}
        if missing:
            raise ValueError(
                f"`towers={kinds}` asks for {sorted(missing)}, but {type(model).__name__} only has these promptable "
                f"towers: {sorted({t.kind for t in towers})}. Change `towers` accordingly."
            )
        towers = [t for t in towers if t.kind in kinds]
    kinds_seen = [t.kind for t in towers]
    if len(set(kinds_seen)) != len(kinds_seen):
        raise ValueError(f"{type(model).__name__} has several {kinds_seen[0]} towers; hf_vpt prompts one per kind.")
    return towers
