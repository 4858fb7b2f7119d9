"""The baselines the recipes and benches train next to hf_vpt's methods, declared once through `hf_vpt.registry`.

Linear probing and full fine-tuning apply no PEFT method (`register_variant`); LoRA is PEFT's own method, described
here (title, paper, card summary, recipe defaults) but registered with PEFT by PEFT itself.
"""

from __future__ import annotations

from peft import LoraConfig, LoraModel
from torch import nn

from .layouts import SUPPORTED_ARCHITECTURES, find_towers
from .registry import MEASURED_ON_REAL_VIT, MethodSpec, TrainingVariant, register, register_variant


def attention_projections(model: nn.Module) -> list[str]:
    """LoRA's targets: the query and value projection of every block of the model's vision tower(s).

    The blocks are found by structure (`hf_vpt.find_towers`), the projections inside a block by the names the
    architecture's layout gives them. Returns the bare names (`["q_proj", "v_proj"]`) when they pick exactly these
    modules, which keeps the saved adapter_config.json free of module paths, else the full module paths.
    """
    towers = find_towers(model)
    towers = [tower for tower in towers if tower.kind == "vision"] or towers
    if not towers:
        supported = ", ".join(spec.name for spec in SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"{type(model).__name__} contains no transformer that hf_vpt knows ({supported}), so the LoRA baseline "
            "cannot find the query/value projections of its attention blocks. Use a model built on one of them, or "
            "give LoRA its target_modules yourself with peft.LoraConfig."
        )
    targets = []
    for tower in towers:
        for block_name, block in zip(tower.block_names, tower.blocks):
            for role, names in (("query", tower.spec.query_names), ("value", tower.spec.value_names)):
                found = [
                    name
                    for name, module in block.named_modules()
                    if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
                ]
                if len(found) != 1:
                    raise ValueError(
                        f"Expected one attention {role} projection (an nn.Linear named one of {names}) in "
                        f"{block_name} ({type(block).__name__}), found {found or 'none'}."
                    )
                targets.append(f"{block_name}.{found[0]}")
    leaves = sorted({target.rsplit(".", 1)[-1] for target in targets})
    same_leaf = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return leaves if same_leaf == set(targets) else targets


def _lora_config(model: nn.Module, *, num_prompt_tokens: int | None = None, head_modules, **overrides) -> LoraConfig:
    # LoRA has no prompt tokens; `num_prompt_tokens` is part of every variant's signature and not used here. Rank 8,
    # alpha 16 on the query and value projections: the setting the learning rate was measured with.
    overrides.setdefault("target_modules", attention_projections(model))
    overrides.setdefault("r", 8)
    overrides.setdefault("lora_alpha", 16)
    return LoraConfig(modules_to_save=list(head_modules) or None, **overrides)


def _lora_summary(config) -> str:
    targets = config.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets
    return f"rank-{config.r} updates (alpha {config.lora_alpha}) of the weights of {targets}"


register_variant(
    TrainingVariant(
        name="linear",
        title="linear probing",
        trains="head",
        optimizer="adamw",
        learning_rate=1e-2,
        weight_decay=0.01,
        defaults_source=MEASURED_ON_REAL_VIT,
        build_config=None,
    )
)
register_variant(
    TrainingVariant(
        name="full",
        title="full fine-tuning",
        trains="all",
        optimizer="adamw",
        learning_rate=3e-4,
        weight_decay=0.01,
        defaults_source=MEASURED_ON_REAL_VIT,
        build_config=None,
    )
)
register(
    MethodSpec(
        name="lora",
        peft_type="LORA",
        config_cls=LoraConfig,
        model_cls=LoraModel,
        title="LoRA",
        paper_title="LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022)",
        paper_url="https://arxiv.org/abs/2106.09685",
        summary=_lora_summary,
        card_usage=None,
        flops=None,
        peft_builtin=True,
        card_settings=("r", "lora_alpha", "target_modules"),
        variants=(
            TrainingVariant(
                name="lora",
                title="LoRA",
                trains="adapter",
                optimizer="adamw",
                learning_rate=3e-3,
                weight_decay=0.01,
                defaults_source=MEASURED_ON_REAL_VIT,
                build_config=_lora_config,
            ),
        ),
    )
)
