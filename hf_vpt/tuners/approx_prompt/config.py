from __future__ import annotations

from dataclasses import dataclass, field

from ..._registry import peft_type
from ...core.config import PromptConfigBase
from ...core.validation import MAX_PROMPT_TOKENS, MAX_WIDTH, Int


ATTENTION_KINDS = ("self", "cross")


@dataclass
class ApproxPromptConfig(PromptConfigBase):
    """Approximated Prompt Tuning (APT, Wu et al., ICCV 2023, https://arxiv.org/abs/2306.15706).

    APT puts no token into the sequence. Each adapted attention sub-layer keeps its frozen output `Y` (after the
    output projection) and adds an "information diffusion" term computed from its input `X̂` (for pre-LN models the
    LayerNorm'ed block input) and learned prompts `P` (`p × d`):

        K̃ = P + P·W_downᵀ·W_upᵀ                 (identity + rank-r key map; W_down r×d ~ N(0, 1), W_up d×r = 0)
        a = Dropout(ReLU(X̂·K̃ᵀ))                 (B, N, p), the layer's attention dropout rate
        out = exp(s) · (Y + stopgrad(max_j a_ij) ⊙ a·P)        (s a learned scalar, init 0)

    with `P ~ N(0, 0.02²)`. This follows the released code (github.com/DoubtedSteam/APT): a single "head" over the
    full width, **no** `1/sqrt(d)` scaling, and the attention/padding mask is **not** used (padded rows get the term
    too). Everything else (pooling, heads, masks, sequence length) is untouched.

    Args:
        num_prompt_tokens (`int`): Number of prompts `p` per adapted layer. The released ViLT file uses 50; the
            paper's ViLT and METER numbers (1.92 M / 3.83 M parameters) correspond to 200.
        rank (`int`): Rank `r` of the key map `W_up·W_down` (4 in the released code).
        layers (`list[int]`, *optional*): Block indices to adapt in every prompted tower; None adapts all blocks.
        attentions (`list[str]`): Which attention sub-layers of a block get APT: "self", and "cross" for models
            with cross-attention (none of the supported transformers architectures has one yet).
    """

    FIELD_RULES = {
        "num_prompt_tokens": Int(1, MAX_PROMPT_TOKENS),
        "rank": Int(1, MAX_WIDTH, note="the released code uses 4"),
    }

    num_prompt_tokens: int = field(
        default=50,
        metadata={
            "help": "Prompts p per adapted attention sub-layer. Default 50 follows the released ViLT code; the "
            "paper's reported ViLT/METER numbers use 200."
        },
    )
    rank: int = field(
        default=4,
        metadata={"help": "Rank r of the low-rank key map K̃ = P (I + W_downᵀ W_upᵀ) (released code: 4)."},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Block indices (0-based) that get APT in each prompted tower; None = all blocks."},
    )
    attentions: list[str] = field(
        default_factory=lambda: ["self"],
        metadata={
            "help": "Attention sub-layers to adapt: 'self', and 'cross' where a model has cross-attention. As in the "
            "released code, APT is single-head over the full width, unscaled (no 1/sqrt(d)) and ignores the "
            "attention mask."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("approx_prompt")
        if not isinstance(self.num_prompt_tokens, int) or isinstance(self.num_prompt_tokens, bool):
            raise ValueError(f"`num_prompt_tokens` must be a positive integer; got {self.num_prompt_tokens!r}.")
        if self.num_prompt_tokens < 1:
            raise ValueError(f"`num_prompt_tokens` must be a positive integer; got {self.num_prompt_tokens!r}.")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer (the released code uses 4); got {self.rank!r}.")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not isinstance(self.layers, (list, tuple)):
                raise ValueError(
                    f"`layers` must be None (all blocks) or a non-empty list of block indices >= 0; got {self.layers!r}."
                )
            self.layers = list(self.layers)
            bad = [i for i in self.layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
            if bad or not self.layers:
                raise ValueError(
                    f"`layers` must be None (all blocks) or a non-empty list of block indices >= 0; got {self.layers!r}."
                )
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"`layers` lists a block more than once: {self.layers!r}.")
            self.layers = sorted(self.layers)
        if isinstance(self.attentions, str):
            self.attentions = [self.attentions]
        if not isinstance(self.attentions, (list, tuple)):
            raise ValueError(
                f"`attentions` must be a non-empty list of distinct values from {ATTENTION_KINDS}; got {self.attentions!r}."
            )
        self.attentions = list(self.attentions)
        bad = [a for a in self.attentions if a not in ATTENTION_KINDS]
        if bad or not self.attentions or len(set(self.attentions)) != len(self.attentions):
            raise ValueError(
                f"`attentions` must be a non-empty list of distinct values from {ATTENTION_KINDS}; got {self.attentions!r}."
            )
        if self.keep_prompts_in_outputs:
            raise ValueError(
                "APT puts no prompt tokens into the sequence, so there is nothing to keep in the outputs; leave "
                "`keep_prompts_in_outputs=False`."
            )

    @property
    def bank_key_prefix(self) -> str:
        return "base_model.approx_prompt_bank."

    def adapted_layers(self, num_layers: int) -> list[int]:
        """The block indices of a tower with `num_layers` blocks that get APT, in order (one bank row each)."""
        if self.layers is None:
            return list(range(num_layers))
        return [i for i in self.layers if i < num_layers]

    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        p, r = self.num_prompt_tokens, self.rank
        for kind, (num_layers, d) in (self.tower_shapes or {}).items():
            rows = len(self.adapted_layers(num_layers)) * len(self.attentions)
            prefix = self.bank_key_prefix
            shapes[f"{prefix}prompts.{kind}"] = (rows, p, d)
            shapes[f"{prefix}key_down.{kind}"] = (rows, r, d)
            shapes[f"{prefix}key_up.{kind}"] = (rows, d, r)
            shapes[f"{prefix}scale.{kind}"] = (rows,)
        return shapes

    def check_adapter_file(self, weights_path: str) -> None:
        if self.tower_shapes:
            super().check_adapter_file(weights_path)
