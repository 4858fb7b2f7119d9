from __future__ import annotations

from dataclasses import dataclass, field

from ..._registry import peft_type
from ...core.config import PromptConfigBase
from ...core.validation import MAX_CLASSES, MAX_PROMPT_TOKENS, MAX_WIDTH, Int, Real, TowerShapes


GENERATIVE_TOWER_KIND = "generative"


@dataclass
class GenerativePromptConfig(PromptConfigBase):
    """Generative Visual Prompt Tuning (Sohn et al., CVPR 2023, https://arxiv.org/abs/2210.00990).

    A small generator produces `num_prompt_tokens` prompt tokens per sample from its class label,
    `prompt[c, j] = Dropout(head(LayerNorm(E[c] + Pos[j])))`, and the prompts are prepended to the token sequence
    of a frozen generative image transformer:

    - diffusers `UVit2DModel` (the MaskGIT-style transformer of aMUSEd): prompts enter after `project_to_hidden` and
      leave before `project_from_hidden_norm`, so the convolutional down/up blocks and the 2-D reshape never see
      them;
    - transformers `ImageGPTModel` / `ImageGPTForCausalImageModeling`: prompts come before the SOS token, after the
      position embeddings, so image tokens keep their pretrained positions `0 .. L-1` and every image token attends
      to all prompts.

    Class labels go with the forward: `model(..., class_labels=labels)`. Training helpers are in
    `hf_vpt.tuners.generative_prompt.objectives`, sampling loops in `hf_vpt.sampling`.

    Args:
        num_prompt_tokens (`int`): Prompt length `p` (the paper's default is 32).
        num_classes (`int`, *optional*): Number of classes `C` of the class-conditional generator. None gives the
            unconditional generator: one learned prompt set for every sample.
        generator_width (`int`, *optional*): Width `w` of the class and position embeddings. Default: the model's
            hidden size (then no projection is needed).
        mlp_hidden_size (`int`): 0 (the released default) for no MLP; otherwise the generator maps the normalised
            embeddings through `Linear(w, m) -> GELU -> Linear(m, d)`. With 0 and `w != d` a single linear layer
            maps `w` to `d`.
        prompt_dropout (`float`): Dropout on the generated prompts (the paper uses 0.1).
        init_std (`float`): Standard deviation of the truncated-normal initialisation of the embeddings.
    """

    FIELD_RULES = {
        "num_prompt_tokens": Int(1, MAX_PROMPT_TOKENS),
        "num_classes": Int(1, MAX_CLASSES, optional=True, note="None for an unconditional generator"),
        "generator_width": Int(1, MAX_WIDTH, optional=True),
        "mlp_hidden_size": Int(0, MAX_WIDTH, note="0: no MLP"),
        "prompt_dropout": Real(0.0, 1.0, high_open=True),
        "init_std": Real(0.0, 1e3, low_open=True),
        "tower_shapes": TowerShapes((GENERATIVE_TOWER_KIND,)),
    }

    num_prompt_tokens: int = field(default=32, metadata={"help": "Prompt length p (the paper's default is 32)."})
    num_classes: int | None = field(
        default=None,
        metadata={"help": "Number of classes of the class-conditional generator; None: one unconditional prompt set."},
    )
    generator_width: int | None = field(
        default=None,
        metadata={"help": "Width of the class and position embeddings (default: the model's hidden size)."},
    )
    mlp_hidden_size: int = field(
        default=0,
        metadata={"help": "0: no MLP (released default). > 0: Linear(w, m) -> GELU -> Linear(m, d) after the norm."},
    )
    prompt_dropout: float = field(default=0.1, metadata={"help": "Dropout on the generated prompts, in [0, 1)."})
    init_std: float = field(
        default=0.02, metadata={"help": "Std of the truncated-normal initialisation of the class/position tables."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("generative_prompt")
        if self.towers is not None:
            raise ValueError(
                "GenerativePromptConfig prompts the one image-token transformer of the model (UVit2D or ImageGPT); "
                "leave `towers` unset."
            )
        if not isinstance(self.num_prompt_tokens, int) or self.num_prompt_tokens < 1:
            raise ValueError(f"`num_prompt_tokens` must be a positive integer; got {self.num_prompt_tokens!r}.")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(
                f"`num_classes` must be a positive integer, or None for an unconditional generator; got "
                f"{self.num_classes!r}."
            )
        if self.generator_width is not None and (
            not isinstance(self.generator_width, int) or self.generator_width < 1
        ):
            raise ValueError(f"`generator_width` must be a positive integer or None; got {self.generator_width!r}.")
        if not isinstance(self.mlp_hidden_size, int) or self.mlp_hidden_size < 0:
            raise ValueError(
                f"`mlp_hidden_size` must be 0 (no MLP) or a positive integer; got {self.mlp_hidden_size!r}."
            )
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"`prompt_dropout` must be in [0, 1); got {self.prompt_dropout!r}.")
        if not self.init_std > 0:
            raise ValueError(f"`init_std` must be positive; got {self.init_std!r}.")

    @property
    def bank_key_prefix(self) -> str:
        return "base_model.generative_prompt_bank."

    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for kind, (_, hidden) in (self.tower_shapes or {}).items():
            width = self.generator_width or hidden
            key = f"{self.bank_key_prefix}generators.{kind}."
            shapes[key + "class_embeddings"] = (self.num_classes or 1, width)
            shapes[key + "position_embeddings"] = (self.num_prompt_tokens, width)
            shapes[key + "norm.weight"] = (width,)
            shapes[key + "norm.bias"] = (width,)
            if self.mlp_hidden_size:
                shapes[key + "head.0.weight"] = (self.mlp_hidden_size, width)
                shapes[key + "head.0.bias"] = (self.mlp_hidden_size,)
                shapes[key + "head.2.weight"] = (hidden, self.mlp_hidden_size)
                shapes[key + "head.2.bias"] = (hidden,)
            elif width != hidden:
                shapes[key + "head.weight"] = (hidden, width)
                shapes[key + "head.bias"] = (hidden,)
        return shapes

    def check_adapter_file(self, weights_path: str) -> None:
        if self.tower_shapes:
            super().check_adapter_file(weights_path)
