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
    # hierarchical window attention (Swin): stages of blocks with patch merging in between, found by `_windowed_tower`
    windowed: bool = False


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
    # No CLS token; prompts ride beside the windows (see `hf_vpt.tuners.visual_prompt.swin`). VPT only.
    ArchitectureSpec("Swin", ("SwinModel",), "vision", lambda c: 0, windowed=True),
)

# A tuner lists this among its supported tower kinds when it can prompt windowed (Swin) towers.
WINDOWED = "windowed"

# Architectures hf_vpt recognises and refuses, with the reason (checked before anything is wrapped).
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Swinv2Model": (
        "Swin V2 is not supported: its blocks normalise after attention and MLP (res-post-norm), attend with scaled "
        "cosine similarity and get their position bias from a continuous-position MLP, so the VPT-Swin design "
        "(pre-normed prompts attached to every window with zero position bias, KMnP/vpt's Swin V1 code) has no "
        "defined counterpart there, and hf_vpt does not invent one. Use a Swin V1 checkpoint (`SwinModel`, "
        "`SwinForImageClassification`)"
    ),
}


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


@dataclass
class WindowStage:
    """One Swin stage: its blocks (tower block indices from `first_block`), their width, the patch merging after it."""

    first_block: int
    depth: int
    width: int
    merging: nn.Module | None


@dataclass
class WindowedTower(Tower):
    """A hierarchical window-attention tower (Swin): blocks of all stages in order, plus the stage structure."""

    stages: list[WindowStage] = field(default_factory=list)
    pooler: nn.Module | None = None  # the average pool over tokens behind the final norm (None without pooling layer)

    def stage_of(self, block_index: int) -> int:
        for index, stage in enumerate(self.stages):
            if block_index < stage.first_block + stage.depth:
                return index
        raise IndexError(block_index)


def _windowed_tower(spec: ArchitectureSpec, name: str, root: nn.Module, config) -> WindowedTower:
    """Swin's stages, found by structure: the one `ModuleList` of `len(depths)` stages, each holding one list of
    `depths[i]` identical blocks and at most one other module with parameters (the patch merging)."""
    depths = [int(d) for d in config.depths]
    candidates = []
    for list_name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != len(depths):
            continue
        inner = []
        for stage, depth in zip(module, depths):
            lists = [(n, c) for n, c in stage.named_children() if isinstance(c, nn.ModuleList)]
            if len(lists) != 1 or len(lists[0][1]) != depth or len({type(b) for b in lists[0][1]}) != 1:
                break
            others = [c for c in stage.children() if c is not lists[0][1] and any(True for _ in c.parameters())]
            if len(others) > 1:
                break
            inner.append((lists[0][0], lists[0][1], others[0] if others else None))
        else:
            candidates.append((list_name, module, inner))
    if len(candidates) != 1:
        raise ValueError(
            f"Expected exactly one list of {len(depths)} Swin stages with {depths} blocks in {type(root).__name__}, "
            f"found {len(candidates)}."
        )
    list_name, stage_list, inner = candidates[0]
    prefix = f"{name}.{list_name}" if name else list_name
    blocks, block_names, stages = [], [], []
    for index, (blocks_name, stage_blocks, merging) in enumerate(inner):
        norms = [m for m in stage_blocks[0].modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise ValueError(f"Swin stage {index} has no LayerNorm to read its width from.")
        stages.append(WindowStage(len(blocks), len(stage_blocks), int(norms[0].normalized_shape[0]), merging))
        block_names += [f"{prefix}.{index}.{blocks_name}.{j}" for j in range(len(stage_blocks))]
        blocks += list(stage_blocks)
    pooler = next((c for c in root.children() if isinstance(c, nn.AdaptiveAvgPool1d)), None)
    return WindowedTower(
        spec=spec,
        name=name,
        root=root,
        blocks=nn.ModuleList(blocks),  # a view for iteration; the stages still own the blocks
        block_names=block_names,
        final_norm=_find_final_norm(root, stage_list),
        hidden_size=stages[-1].width,
        num_special_tokens=0,
        patch_area=_patch_area(config),
        config=config,
        attention_layouts=[],  # no key/value-prefix path: the prompts' window outputs are read (averaged)
        stages=stages,
        pooler=pooler,
    )


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
        if spec.windowed:
            towers.append(_windowed_tower(spec, name, module, config))
            continue
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
    for module in model.modules():
        reason = UNSUPPORTED_ARCHITECTURES.get(type(module).__name__)
        if reason is not None:
            raise ValueError(f"{type(model).__name__} contains a {type(module).__name__}. {reason}.")
    found = find_towers(model)
    windowed = [t for t in found if t.spec.windowed]
    if windowed and WINDOWED not in supported_kinds:
        raise ValueError(
            f"{type(model).__name__} is a {windowed[0].spec.name} model: it attends within shifted windows, and only "
            "`VisualPromptConfig` can prompt it (prompts attached to every window, as in the official VPT Swin "
            "code). Gated and approximated prompts are defined for global self-attention; use a ViT-family model "
            "for them, or VisualPromptConfig on Swin."
        )
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


def find_towers_of(model: nn.Module, architectures, *, encoder: bool = True) -> list[Tower]:
    """The towers of the given `architectures` (`ArchitectureSpec`s) inside `model`, outermost first, found by
    structure exactly as `find_towers` finds the supported encoders: one finder for every architecture table.

    `encoder=False` is for token-generating stacks (hf_vpt.tuners.generative_prompt.layouts): prompts leave at the
    tower's end rather than at a final norm, there is no patch grid, and no key/value-prefix fast path.
    """
    architectures = tuple(architectures)
    towers: list[Tower] = []
    for name, module in model.named_modules():
        spec = next((s for s in architectures if type(module).__name__ in s.root_classes), None)
        if spec is None or any(name.startswith(t.name + ".") for t in towers if t.name):
            continue
        config = module.config
        spec.check_config(config)
        block_list_name, blocks = _find_block_list(module, _config_int(config, "num_hidden_layers"))
        prefix = f"{name}.{block_list_name}" if name else block_list_name
        towers.append(
            Tower(
                spec=spec,
                name=name,
                root=module,
                blocks=blocks,
                block_names=[f"{prefix}.{i}" for i in range(len(blocks))],
                final_norm=_find_final_norm(module, blocks) if encoder else None,
                hidden_size=_config_int(config, "hidden_size"),
                num_special_tokens=spec.num_special_tokens(config),
                patch_area=_patch_area(config) if encoder else 1,
                config=config,
                attention_layouts=[find_attention_layout(block, spec) for block in blocks] if encoder else [],
            )
        )
    return towers


def _config_int(config, name: str) -> int:
    # transformers configs are objects, diffusers configs (FrozenDict) mappings
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    if value is None:
        raise ValueError(f"The model config has no `{name}`; cannot find its transformer blocks.")
    return int(value)
