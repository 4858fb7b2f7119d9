from __future__ import annotations

from dataclasses import dataclass, field

from ..._registry import peft_type
from ...core.config import PromptConfigBase
from ...core.validation import MAX_LAYERS, MAX_PROMPT_TOKENS, MAX_WIDTH, Bool, Choice, ConfigValueError, Int, Real


DEPTHS = ("shallow", "deep")
PROMPT_INITS = ("vpt_uniform", "normal", "zeros")
READOUTS = ("default", "mean_unit_norm", "mean_model_norm")


@dataclass(frozen=True)
class StageShapes:
    """None or {tower kind: [[depth, width], ...]}: the stages of a Swin tower, recorded when an adapter is made."""

    def check(self, name: str, value):
        if value is None:
            return None
        allowed = (
            f"None or {{tower kind: [[blocks in [1, {MAX_LAYERS}], width in [1, {MAX_WIDTH}]], ...]}} (hf_vpt records "
            "it for Swin; restore the adapter_config.json that was saved with the weights)"
        )

        def is_stage(stage) -> bool:
            return (
                isinstance(stage, (list, tuple))
                and len(stage) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in stage)
                and 1 <= stage[0] <= MAX_LAYERS
                and 1 <= stage[1] <= MAX_WIDTH
            )

        if not isinstance(value, dict) or not all(
            isinstance(kind, str) and isinstance(stages, (list, tuple)) and stages and all(map(is_stage, stages))
            for kind, stages in value.items()
        ):
            raise ConfigValueError(f"`{name}` must be {allowed}; got {value!r}.")
        return {kind: [[int(d), int(w)] for d, w in stages] for kind, stages in value.items()}


@dataclass
class VisualPromptConfig(PromptConfigBase):
    """Visual Prompt Tuning (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119).

    Learnable tokens are placed after the special tokens of a frozen vision transformer, in the layout
    `[special tokens, prompts, patch tokens]`, after the position embeddings. Prompts get no position embedding.
    They are removed from the sequence after the last block, so heads, poolers and `hidden_states` see the original
    layout.

    Args:
        num_prompt_tokens (`int`): Number of prompt tokens `p` (per block for deep prompts).
        depth (`str`): `"shallow"` inserts the prompts once before block 0; `"deep"` gives every block its own prompts,
            replacing the previous block's outputs at the prompt positions.
        num_deep_layers (`int`, *optional*): With `depth="deep"`, only the first `num_deep_layers` blocks get new
            prompts; later blocks carry the prompt outputs along like shallow prompts.
        prompt_init (`str`): `"vpt_uniform"` (the official VPT initialisation, U(±sqrt(6 / (3·patch_h·patch_w + d)))),
            `"normal"` (N(0, 0.02²)) or `"zeros"`.
        prompt_dropout (`float`): Dropout on the prompts at every insertion (the official deep VTAB runs use 0.1).
        prompt_projection_dim (`int`, *optional*): Store prompts in this width and map them to the hidden size with
            a learned linear layer (VPT's `PROJECT` option).
        kv_prefix (`bool`): Run deep prompts as batch-shared key/value prefixes where that is exact (default True);
            results never depend on the path.
        readout (`str`): `"default"` keeps the model's own readout (the CLS token after the final norm, the official
            supervised-ViT readout); `"mean_unit_norm"` is the official VPT readout for MAE (mean of all tokens
            except CLS, prompts included, then a LayerNorm without affine parameters); `"mean_model_norm"` is the
            gated-prompt code's MAE readout (the same mean, then the pretrained final norm). Both mean readouts are
            written into the CLS slot of the final sequence, so heads that read token 0 consume them.

    On Swin (`SwinModel`, `SwinForImageClassification`) the prompts are attached to every attention window, carried
    through patch merging and averaged into the pooled output, as in the official VPT Swin code; deep prompts are
    stored per stage with each stage's width. See `hf_vpt.tuners.visual_prompt.swin`.
    """

    FIELD_RULES = {
        "num_prompt_tokens": Int(1, MAX_PROMPT_TOKENS),
        "depth": Choice(DEPTHS),
        "num_deep_layers": Int(1, MAX_LAYERS, optional=True),
        "prompt_init": Choice(PROMPT_INITS),
        "prompt_dropout": Real(0.0, 1.0, high_open=True),
        "prompt_projection_dim": Int(1, MAX_WIDTH, optional=True),
        "kv_prefix": Bool(),
        "readout": Choice(READOUTS),
        "stage_shapes": StageShapes(),
    }

    num_prompt_tokens: int = field(default=10, metadata={"help": "Number of prompt tokens per prompted block."})
    depth: str = field(
        default="deep",
        metadata={"help": "'shallow' (prompts enter before block 0) or 'deep' (new prompts before every block)."},
    )
    num_deep_layers: int | None = field(
        default=None,
        metadata={"help": "With depth='deep': give new prompts only to the first k blocks (None: all blocks)."},
    )
    prompt_init: str = field(
        default="vpt_uniform",
        metadata={
            "help": "'vpt_uniform' (official: U(±sqrt(6/(3·patch_h·patch_w + d)))), 'normal' (std 0.02) or 'zeros'."
        },
    )
    prompt_dropout: float = field(
        default=0.0, metadata={"help": "Dropout rate on the prompts at each insertion, in [0, 1)."}
    )
    prompt_projection_dim: int | None = field(
        default=None,
        metadata={
            "help": "If set, prompts are stored with this width and projected to the hidden size (VPT PROJECT)."
        },
    )
    kv_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run deep prompts as batch-shared key/value prefixes wherever that is exact (their outputs are "
            "discarded by the next block): same outputs, a fraction of the compute. The concatenation path runs "
            "where something reads the prompt outputs (mean readouts, kept prompt positions, the last deep block "
            "before shallow-style blocks, causal towers). False always concatenates."
        },
    )
    readout: str = field(
        default="default",
        metadata={
            "help": "'default' (the model's readout, CLS after the final norm), 'mean_unit_norm' (official VPT MAE "
            "readout: mean over all non-CLS tokens incl. prompts, then a LayerNorm without affine) or "
            "'mean_model_norm' (gated-prompt MAE readout: the same mean, then the pretrained final norm)."
        },
    )

    stage_shapes: dict[str, list[list[int]]] | None = field(
        default=None,
        metadata={
            "help": "Recorded for Swin when the adapter is created: {tower kind: [[blocks, width] per stage]}. "
            "Deep prompts are stored per stage with each stage's width; loading checks it against the model."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("visual_prompt")
        if not isinstance(self.num_prompt_tokens, int) or self.num_prompt_tokens < 1:
            raise ValueError(f"`num_prompt_tokens` must be a positive integer; got {self.num_prompt_tokens!r}.")
        if self.depth not in DEPTHS:
            raise ValueError(f"`depth` must be one of {DEPTHS}; got {self.depth!r}.")
        if self.num_deep_layers is not None:
            if self.depth != "deep":
                raise ValueError("`num_deep_layers` only applies to depth='deep'; remove it or set depth='deep'.")
            if (
                not isinstance(self.num_deep_layers, int)
                or isinstance(self.num_deep_layers, bool)
                or self.num_deep_layers < 1
            ):
                raise ValueError(f"`num_deep_layers` must be a positive integer; got {self.num_deep_layers!r}.")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"`prompt_init` must be one of {PROMPT_INITS}; got {self.prompt_init!r}.")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"`prompt_dropout` must be in [0, 1); got {self.prompt_dropout!r}.")
        if self.prompt_projection_dim is not None and (
            not isinstance(self.prompt_projection_dim, int)
            or isinstance(self.prompt_projection_dim, bool)
            or self.prompt_projection_dim < 1
        ):
            raise ValueError(
                f"`prompt_projection_dim` must be a positive integer; got {self.prompt_projection_dim!r}."
            )
        if not isinstance(self.kv_prefix, bool):
            raise ValueError(f"`kv_prefix` must be True or False; got {self.kv_prefix!r}.")
        if self.readout not in READOUTS:
            raise ValueError(f"`readout` must be one of {READOUTS}; got {self.readout!r}.")

    @property
    def bank_key_prefix(self) -> str:
        return "base_model.visual_prompt_bank."

    def prompt_rows(self, num_layers: int) -> int:
        """How many prompt sets one tower stores: 1 for shallow, one per prompted block for deep."""
        if self.depth == "shallow":
            return 1
        return min(self.num_deep_layers or num_layers, num_layers)

    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for kind, (num_layers, hidden) in (self.tower_shapes or {}).items():
            if kind in (self.stage_shapes or {}):
                shapes.update(self._stage_bank_shapes(kind))
                continue
            width = self.prompt_projection_dim or hidden
            shapes[f"{self.bank_key_prefix}embeddings.{kind}"] = (
                self.prompt_rows(num_layers),
                self.num_prompt_tokens,
                width,
            )
            if self.prompt_projection_dim:
                shapes[f"{self.bank_key_prefix}projection.{kind}.weight"] = (hidden, width)
                shapes[f"{self.bank_key_prefix}projection.{kind}.bias"] = (hidden,)
        return shapes

    def _stage_bank_shapes(self, kind: str) -> dict[str, tuple[int, ...]]:
        """Swin: one `[rows, p, width]` tensor per stage that has prompt sets (`swin.py`, `stage_rows`)."""
        shapes, first = {}, 0
        stages = self.stage_shapes[kind]
        total = sum(depth for depth, _ in stages)
        prompted = 1 if self.depth == "shallow" else min(self.num_deep_layers or total, total)
        for index, (depth, hidden) in enumerate(stages):
            rows = max(0, min(depth, prompted - first))
            first += depth
            if rows == 0:
                continue
            width = self.prompt_projection_dim or hidden
            shapes[f"{self.bank_key_prefix}embeddings.{kind}_stage{index}"] = (rows, self.num_prompt_tokens, width)
            if self.prompt_projection_dim:
                shapes[f"{self.bank_key_prefix}projection.{kind}_stage{index}.weight"] = (hidden, width)
                shapes[f"{self.bank_key_prefix}projection.{kind}_stage{index}.bias"] = (hidden,)
        return shapes

    def check_adapter_file(self, weights_path: str) -> None:
        if self.tower_shapes:  # configs written before the shapes were recorded cannot be checked here
            super().check_adapter_file(weights_path)
