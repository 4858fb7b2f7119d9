"""Extra forward FLOPs of prompt methods, from closed-form counts (1 multiply-accumulate = 2 FLOPs).

Only matrix products are counted, the convention of `torch.utils.flop_counter.FlopCounterMode` and of the APT paper
(element-wise ops, norms, softmax/ReLU and the max are ignored). Per prompted block, with `N` real tokens, `p` prompts,
width `d`, MLP width `d_ff`, key-map rank `r` and batch `B`:

* APT: `B·(2·N·p·d + 2·N·p·d)` for `X̂·K̃ᵀ` and `a·P`, plus `2·(2·p·d·r)` for the key map `P·W_downᵀ·W_upᵀ`, which
  does not depend on the input and is computed once per forward (not per sample).
* Deep prompts as hf_vpt runs them (`mode="concat"`: prompts are part of the sequence, so they are projected, attend,
  are attended to and go through the MLP): `B·2·(4·p·d² + 2·p·d·d_ff + 2·((N+p)² − N²)·d)`.
* Deep prompts as hf_vpt's exact key/value-prefix path runs them (`mode="shared_kv_prefix"`, the default of
  `VisualPromptConfig(depth="deep")` where exact): `2·(2·p·d²)` once per forward for `k_proj`/`v_proj` of the
  prompts (batch-shared) plus `B·2·(2·N·p·d)`.
* Deep prompts as the APT paper's baseline runs them (`mode="kv_prefix"`: the released deep-prompt code computes
  q, k, v for the `N + p` rows, then uses the prompts as keys/values only): `B·2·(3·p·d² + 2·N·p·d)`.

Windowed towers (Swin) have no closed form here: VPT attaches the prompts to every window and merges them between
stages, so `extra_forward_flops` refuses them (measure with `torch.utils.flop_counter.FlopCounterMode` instead).

The APT paper's "additional FLOPs" (ViLT: APT 0.91 G vs deep prompt 5.14 G, −82.3 %) are the MAC counts of the
`kv_prefix` formula and of APT without the key map; multiply the numbers here by 0.5 to compare.
"""

from __future__ import annotations

from .layouts import Tower, select_towers


DEEP_PROMPT_MODES = ("concat", "shared_kv_prefix", "kv_prefix")


def approx_prompt_flops(
    *, num_layers: int, hidden_size: int, seq_len: int, num_prompt_tokens: int, rank: int, batch_size: int = 1
) -> int:
    """Extra forward FLOPs of APT on `num_layers` adapted attention sub-layers."""
    n, p, d, r = seq_len, num_prompt_tokens, hidden_size, rank
    return num_layers * (batch_size * 4 * n * p * d + 4 * p * d * r)


def deep_prompt_flops(
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    seq_len: int,
    num_prompt_tokens: int,
    batch_size: int = 1,
    mode: str = "concat",
) -> int:
    """Extra forward FLOPs of `p` prompt tokens in `num_layers` blocks (see the module docstring for `mode`)."""
    n, p, d, f = seq_len, num_prompt_tokens, hidden_size, intermediate_size
    if mode == "shared_kv_prefix":
        return num_layers * (2 * 2 * p * d * d + batch_size * 2 * 2 * n * p * d)
    if mode == "concat":
        per_sample = 2 * (4 * p * d * d + 2 * p * d * f + 2 * ((n + p) ** 2 - n**2) * d)
    elif mode == "kv_prefix":
        per_sample = 2 * (3 * p * d * d + 2 * n * p * d)
    else:
        raise ValueError(f"`mode` must be one of {DEEP_PROMPT_MODES}; got {mode!r}.")
    return num_layers * batch_size * per_sample


def mlp_width(tower: Tower) -> int:
    """The MLP width of a tower's blocks (for `deep_prompt_flops`)."""
    config = tower.config
    size = getattr(config, "intermediate_size", None)
    if size is None:  # Dinov2 spells it as a ratio
        size = int(tower.hidden_size * getattr(config, "mlp_ratio", 4))
    return int(size)


def extra_forward_flops(
    model, config, seq_len: int | dict[str, int], batch_size: int = 1, mode: str = "concat"
) -> int:
    """Extra forward FLOPs of the adapter `config` on `model` (a base model or a PeftModel).

    The formula is the method's own (`MethodSpec.flops` in `hf_vpt.registry`); a method without one raises.

    Args:
        model: the model the adapter is (or would be) applied to; its prompted towers are found as at injection.
        config: the config of a registered method with a FLOP formula (VPT, gated prompts, APT).
        seq_len: number of tokens each prompted tower processes without prompts (special tokens included), one int
            for all towers or `{tower kind: length}` (e.g. ViLT-B/32 at 384×384 with 40 text tokens: 40 + 1 + 144).
        batch_size: number of samples per forward.
        mode: for prompts in the sequence: "concat" (prompts in the sequence, `kv_prefix=False` or where the prefix
            path is not exact), "shared_kv_prefix" (hf_vpt's exact deep fast path) or "kv_prefix" (the APT paper's
            baseline).
    """
    from .registry import find_method_spec, registered_methods

    spec = find_method_spec(config)
    if spec is None or spec.flops is None:
        with_formula = [m.config_cls.__name__ for m in registered_methods() if m.flops is not None]
        what = f"{spec.title} ({type(config).__name__})" if spec else type(config).__name__
        raise TypeError(
            f"No FLOP formula for {what}: its method declares none (`MethodSpec.flops` in hf_vpt.registry). Methods "
            f"with one: {', '.join(with_formula)}."
        )
    if mode not in DEEP_PROMPT_MODES:
        raise ValueError(f"`mode` must be one of {DEEP_PROMPT_MODES}; got {mode!r}.")
    towers = select_towers(model, config.towers, spec.model_cls.supported_tower_kinds)
    for tower in towers:
        if tower.spec.windowed:
            raise ValueError(
                f"No closed-form FLOP count for prompts on {tower.spec.name} ({type(model).__name__}): it attends "
                "within shifted windows and VPT attaches the prompts to every window (and merges them between "
                "stages), so the global-attention formulas of hf_vpt.flops would return a wrong number. Measure the "
                "prompted and the plain forward instead (`with model.disable_adapter():`) with "
                "torch.utils.flop_counter.FlopCounterMode on a model loaded with attn_implementation='eager' (the "
                "counter may miss fused CPU attention kernels), and take the difference."
            )
    total = 0
    for tower in towers:
        n = seq_len[tower.kind] if isinstance(seq_len, dict) else seq_len
        total += spec.flops(tower, config, seq_len=n, batch_size=batch_size, mode=mode)
    return total
