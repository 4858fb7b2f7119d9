from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ..._registry import peft_type
from ...core.validation import Bool, Real
from ..visual_prompt.config import VisualPromptConfig


def _is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GatedPromptConfig(VisualPromptConfig):
    """Gated Prompt Tuning (Yoo et al., ICML 2023, https://arxiv.org/abs/2306.05067).

    Shallow visual prompts (inserted once before block 0, after the special tokens, exactly as
    `VisualPromptConfig(depth="shallow")`) whose states are steered by two sets of learned scalars:

    - a gate `g_l = sigmoid(γ_l)` for every block but the last: after block `l` the prompt slice becomes
      `g_l · (block output at the prompt positions) + (1 − g_l) · (prompt slice that went into block l)`;
    - a temperature `τ_l` for every block: its attention becomes `softmax(q·kᵀ / (sqrt(d_head) · τ_l))` for all
      queries (CLS, prompts and patches). τ starts at 1 and is clamped in place to
      `[min_temperature, max_temperature]` at the start of every forward, as the official code does.

    The gates start at `γ_l = −gate_init`, i.e. almost closed (the prompts then reach every block nearly unchanged);
    training opens the gates of the blocks that should write into the prompts. `hf_vpt.gate_values(model)` reports
    the current gates and temperatures per block.

    Args:
        num_prompt_tokens (`int`): Number of prompt tokens `p`.
        gate_init (`float`): The initial gate prior `k`; every gate logit starts at `γ = −k`, so the gates start at
            `sigmoid(−k)` (10 → 4.5e-5, 5 → 6.7e-3, 1 → 0.27). The paper's Table 5 calls this value "GATE INIT."
            ("initialized gate prior") and lists `k`; the official code default is 10.
        learn_temperature (`bool`): Learn one attention temperature per block (the official setting). With False
            the attention is left as pretrained (τ = 1) and the adapter stores no temperatures.
        min_temperature (`float`), max_temperature (`float`): The clamp range of the temperatures (official:
            0.01 and 10).
        prompt_init, prompt_dropout, prompt_projection_dim, readout: as in `VisualPromptConfig`. The gated-prompt
            code's MAE readout is `readout="mean_model_norm"` (mean over all tokens but CLS, prompts included, then
            the pretrained final norm).
        depth (`str`): Only `"shallow"`; the method is not defined for deep prompts (use
            `VisualPromptConfig(depth="deep")` for VPT-deep).
    """

    FIELD_RULES = {
        "gate_init": Real(
            -1e4,
            1e4,
            text="a finite number (the initial gate prior k; gates start at sigmoid(-k), the official default is 10)",
        ),
        "learn_temperature": Bool(),
        "min_temperature": Real(0.0, 1e4, low_open=True, text="a positive finite number"),
        "max_temperature": Real(0.0, 1e4, low_open=True, text="a positive finite number"),
    }

    depth: str = field(
        default="shallow",
        metadata={
            "help": "Must be 'shallow': gated prompt tuning inserts its prompts once before block 0. The official "
            "code silently drops gates and temperatures for deep prompts, so 'deep' is rejected here."
        },
    )
    gate_init: float = field(
        default=10.0,
        metadata={
            "help": "Initial gate prior k: gate logits start at -k, gates at sigmoid(-k) (10 -> 4.5e-5). The paper's "
            "Table 5 calls it 'GATE INIT.' (initialized gate prior); the official code default is 10."
        },
    )
    learn_temperature: bool = field(
        default=True,
        metadata={
            "help": "Learn one attention temperature per block (softmax(q.k / (sqrt(d_head) * tau))). False keeps the "
            "pretrained attention (tau = 1) and stores no temperatures."
        },
    )
    min_temperature: float = field(
        default=0.01, metadata={"help": "Lower end of the clamp applied to the temperatures before every forward."}
    )
    max_temperature: float = field(
        default=10.0, metadata={"help": "Upper end of the clamp applied to the temperatures before every forward."}
    )

    def __post_init__(self):
        if self.depth != "shallow" or self.num_deep_layers is not None:
            raise ValueError(
                f"Gated prompt tuning is defined for shallow prompts only (got depth={self.depth!r}, "
                f"num_deep_layers={self.num_deep_layers!r}): its gates mix each block's prompt outputs with the "
                "block's prompt inputs, which deep prompts would overwrite. Leave `depth='shallow'` and "
                "`num_deep_layers=None`, or use `VisualPromptConfig(depth='deep')` for VPT-deep."
            )
        super().__post_init__()
        self.peft_type = peft_type("gated_prompt")
        if not _is_real_number(self.gate_init):
            raise ValueError(
                f"`gate_init` must be a finite number (the initial gate prior k; gates start at sigmoid(-k), the "
                f"official default is 10); got {self.gate_init!r}."
            )
        self.gate_init = float(self.gate_init)
        if not isinstance(self.learn_temperature, bool):
            raise ValueError(f"`learn_temperature` must be True or False; got {self.learn_temperature!r}.")
        for name in ("min_temperature", "max_temperature"):
            value = getattr(self, name)
            if not _is_real_number(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive finite number; got {value!r}.")
            setattr(self, name, float(value))
        if self.min_temperature > self.max_temperature:
            raise ValueError(
                f"`min_temperature` ({self.min_temperature}) must not exceed `max_temperature` "
                f"({self.max_temperature}); the official range is [0.01, 10]."
            )

    @property
    def bank_key_prefix(self) -> str:
        return "base_model.gated_prompt_bank."

    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_bank_shapes()
        for kind, (num_layers, _hidden) in (self.tower_shapes or {}).items():
            shapes[f"{self.bank_key_prefix}gate_logits.{kind}"] = (num_layers - 1,)
            if self.learn_temperature:
                shapes[f"{self.bank_key_prefix}temperatures.{kind}"] = (num_layers,)
        return shapes
