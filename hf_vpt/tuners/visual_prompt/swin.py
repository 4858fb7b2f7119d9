"""Visual Prompt Tuning on Swin (V1), the official VPT code's second backbone.

What the official code (`KMnP/vpt`, `src/models/vit_prompt/swin_transformer.py` and the `BasicLayer` of
`src/models/vit_backbones/swin_transformer.py`) does, step by step, and what hf_vpt does:

1. **Insertion.** `p` prompts `[1, p, C0]` are dropped out (one mask per sample) and prepended to the patch
   embeddings (after the patch norm, absolute position embedding and dropout): `[prompts, patches]`. No position
   embedding for the prompts. hf_vpt: the same, but the prompts travel *beside* the patch sequence (per forward, on
   the tuner) instead of inside it, so every upstream module that reshapes the sequence to a 2-D map (padding,
   `reshaped_hidden_states`, patch merging) sees the original shapes and the caller never sees a prompt.
2. **Inside every block.** `norm1` is applied to all tokens (prompts included); the normed prompts are split off,
   the patches go through padding, cyclic shift and window partition, and the normed prompts are prepended to
   *every* window (`[p + ws², C]`, the same prompts in all windows). The relative-position bias and the shift mask
   are padded with zeros for the prompt rows and columns: prompts get no position bias and no shift mask, and see
   and are seen by every token of the window. The attention output of the prompts, one set per window, is reduced
   by the **mean over the windows** (`prompt_out.view(-1, B, p, C).mean(0)`). Then the prompts rejoin the sequence
   for the residual (drop path), `norm2` and the MLP like any token. The official code assumes feature maps that
   the window divides; transformers zero-pads them after `norm1` (and at patch merging), and hf_vpt keeps that: the
   prompts see the padded positions of a window as its patches do.
3. **Batch pairing (where hf_vpt differs).** `window_partition` orders windows batch-major (row `b * nW + w`), but
   the official code expands the prompts window-major (`prompt.unsqueeze(0).expand(nW, B, p, C).reshape(-1, p, C)`,
   row `w * B + b`) and reduces them the same way. For a batch of one that is exact; for `B > 1` window row
   `b * nW + w` gets the prompts of sample `(b * nW + w) mod B`, so a sample attends to other samples' prompts and
   its prediction depends on the rest of its batch. hf_vpt pairs each sample's windows with its own prompts
   (`repeat_interleave` over windows) and averages each sample's prompt outputs over its own windows; for a batch
   of one both agree. `tests/methods/visual_prompt/test_swin_prompt.py` checks that a sample's output does not
   depend on its batch.
4. **Patch merging.** The prompts `[B, p, C]` are repeated 4× along the channel dimension (`[P, P, P, P]`, `4C`)
   and go through the merging's norm and reduction with the merged patches (`[B, p, 2C]`). hf_vpt: the same.
5. **Deep prompts.** One `[p, C_s]` set per block, with each stage's width `C_s`. The official code keeps the first
   block's set as `prompt_embeddings` and `deep_prompt_embeddings_0` as `[depth_0 - 1, p, C0]`, and
   `deep_prompt_embeddings_s` as `[depth_s, p, C_s]` for later stages (hard-coded for 4 stages). Before every block
   but the very first, the carried prompts are replaced by the block's set (so the merged prompts of a stage end are
   replaced by the next stage's first set). Dropout is applied to the whole stage tensor, i.e. one mask shared by
   the batch. hf_vpt stores one tensor per stage, `embeddings.<tower>_stage<s>` of shape `[rows_s, p, width_s]`
   (stage 0 includes the first block's set, so the shallow and deep layouts agree), and draws dropout masks per
   sample, like its ViT path. `num_deep_layers=k` gives new prompts to the first `k` blocks in order across stages.
6. **Readout.** The final norm on all tokens (prompts included), then the average over **all** tokens, prompts
   included: `pooler_output` of `SwinModel` and the input of `SwinForImageClassification`'s classifier. hf_vpt:
   the same (a hook on the pooler adds the normed prompts to the average); `last_hidden_state`, `hidden_states`,
   `reshaped_hidden_states` and `attentions` come back without prompt positions. A `SwinModel` built without a
   pooling layer has no readout to include them in.
7. **Initialisation and projection.** All prompt sets are U(±sqrt(6 / (3·patch² + C0))) with the *first* stage's
   width `C0`, also for the wider later stages; hf_vpt does the same. The official model creates `prompt_proj`
   when `PROJECT > -1` but never applies it on Swin; hf_vpt applies `prompt_projection_dim` as on ViT, with one
   projection per stage (`width -> C_s`).

Not supported on Swin (a clear error when an adapter is created): `readout` other than "default" (the pooler is
the readout), `keep_prompts_in_outputs` (Swin's outputs are 2-D maps), gated and approximated prompts (defined for
global attention), and Swin V2 (see `hf_vpt.layouts.UNSUPPORTED_ARCHITECTURES`). The key/value-prefix path is not
implemented for windowed attention: `kv_prefix` is accepted and the concatenation path runs, as on every tower
without that path (ViLT), with the same results. Gradient checkpointing is refused in training forwards
(transformers replays whole stages in backward, without the prompts that travel beside them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..._compat import (
    SwinLayerCall,
    attention_function,
    attention_settings,
    block_uses_gradient_checkpointing,
    swin_layer_call,
    swin_merge_features,
)
from ...core.config import AdapterLoadError
from ...layouts import WindowedTower
from .layer import VisualPromptBlock


PROMPTS = "swin_prompts"  # key of the carried `[B, p, C_s]` prompts in a tower forward's `extras`


def stage_key(kind: str, stage: int) -> str:
    return f"{kind}_stage{stage}"


def stage_rows(config, tower: WindowedTower) -> list[int]:
    """How many prompt sets each stage stores: stage 0 one (shallow), or one per prompted block (deep)."""
    if config.depth == "shallow":
        return [1] + [0] * (len(tower.stages) - 1)
    prompted = min(config.num_deep_layers or tower.num_layers, tower.num_layers)
    return [max(0, min(stage.depth, prompted - stage.first_block)) for stage in tower.stages]


def stage_shapes(tower: WindowedTower) -> list[list[int]]:
    return [[stage.depth, stage.width] for stage in tower.stages]


def check_swin_config(config, towers) -> None:
    """Refuse what VPT-Swin does not define, and an adapter recorded for other stages, before anything changes."""
    for tower in towers:
        if not tower.spec.windowed:
            continue
        if config.readout != "default":
            raise ValueError(
                f"`readout={config.readout!r}` is a ViT/MAE readout; on {tower.spec.name} the readout is the final "
                "norm then the average over all tokens including prompts (the official VPT Swin readout, the "
                "pooler). Use readout='default'."
            )
        if config.keep_prompts_in_outputs:
            raise ValueError(
                f"`keep_prompts_in_outputs=True` is not supported on {tower.spec.name}: its hidden states are "
                "reshaped to 2-D feature maps, which have no place for prompt tokens. Use the default False."
            )
        recorded = (config.stage_shapes or {}).get(tower.kind)
        if recorded is not None and [list(s) for s in recorded] != stage_shapes(tower):
            raise AdapterLoadError(
                f"The adapter was trained for a {tower.spec.name} with stages [depth, width] {recorded}, but this "
                f"model has {stage_shapes(tower)}. Load it onto the base model it was trained on "
                f"(`base_model_name_or_path={config.base_model_name_or_path!r}`)."
            )


class SwinPromptBank(nn.Module):
    """One adapter's Swin prompts: `embeddings["<kind>_stage<s>"]` is `[rows_s, p, width_s]` (stages without rows are
    absent), `projection["<kind>_stage<s>"]` maps a projected width to the stage's width."""

    def __init__(self, config, towers: list[WindowedTower]):
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.projection = nn.ModuleDict()
        self.dropout = nn.Dropout(config.prompt_dropout)
        self.first_blocks: dict[str, list[int]] = {}
        for tower in towers:
            config.stage_shapes = {**(config.stage_shapes or {}), tower.kind: stage_shapes(tower)}
            # official: one bound from the first stage's width, for every stage
            bound = math.sqrt(6.0 / (3 * tower.patch_area + tower.stages[0].width))
            for index, (stage, rows) in enumerate(zip(tower.stages, stage_rows(config, tower))):
                if rows == 0:
                    continue
                width = config.prompt_projection_dim or stage.width
                prompts = torch.empty(rows, config.num_prompt_tokens, width, dtype=torch.float32)
                if config.prompt_init == "vpt_uniform":
                    nn.init.uniform_(prompts, -bound, bound)
                elif config.prompt_init == "normal":
                    nn.init.normal_(prompts, std=0.02)
                else:
                    nn.init.zeros_(prompts)
                self.embeddings[stage_key(tower.kind, index)] = nn.Parameter(prompts)
                if config.prompt_projection_dim:
                    projection = nn.Linear(width, stage.width)
                    nn.init.kaiming_normal_(projection.weight, a=0, mode="fan_out")
                    self.projection[stage_key(tower.kind, index)] = projection

    def prompts(self, tower: WindowedTower, block: int) -> torch.Tensor | None:
        """The `[p, C_s]` prompts that block `block` (tower order) starts with, or None if it carries the previous."""
        stage = tower.stage_of(block)
        key = stage_key(tower.kind, stage)
        row = block - tower.stages[stage].first_block
        if key not in self.embeddings or row >= self.embeddings[key].shape[0]:
            return None
        prompts = self.embeddings[key][row]
        if key in self.projection:
            prompts = self.projection[key](prompts)
        return prompts


def block_prompts(tuner, run, tower: WindowedTower, block: int, carried, dtype: torch.dtype) -> torch.Tensor:
    """The `[B, p, C_s]` prompts entering block `block`: each sample's adapter's new set (with dropout) where it has
    one, the carried prompts elsewhere."""
    banks = tuner.banks
    new = {name: banks[name].prompts(tower, block) for name in run.route.adapters}
    has = [name for name in run.route.adapters if new[name] is not None]
    if not has:
        return carried
    template = new[has[0]]
    fresh = run.route.gather(lambda name: new[name] if new[name] is not None else torch.zeros_like(template))
    fresh = run.route.apply_per_adapter(fresh.to(dtype), lambda name, x: banks[name].dropout(x))
    if len(has) == len(run.route.adapters):
        return fresh
    if carried is None:
        raise RuntimeError("Swin prompts: the first block has no prompts for some samples.")  # stage 0 always has
    has_row = run.route.sample_mask(lambda name: new[name] is not None, fresh.device)
    return torch.where(has_row[:, None, None], fresh, carried)


def window_attention(call: SwinLayerCall, tokens: torch.Tensor, count: int, batch: int, shift_mask):
    """Window attention over `[B*nW, p + ws², C]` with zero position bias and no shift mask on the prompt rows and
    columns. Returns the projected output and the attention weights of the patch positions (or None)."""
    rows, length, _ = tokens.shape
    shape = (rows, length, call.num_heads, -1)
    query = call.query(tokens).view(shape).transpose(1, 2)
    key = call.key(tokens).view(shape).transpose(1, 2)
    value = call.value(tokens).view(shape).transpose(1, 2)
    bias = F.pad(call.position_bias(), (count, 0, count, 0))  # [1, heads, L, L]
    if shift_mask is not None:
        mask = F.pad(shift_mask, (count, 0, count, 0))  # [nW, L, L], batch-major like the windows
        bias = bias + mask[None, :, None].expand(batch, -1, -1, -1, -1).reshape(rows, 1, length, length)
    settings = attention_settings(call.attention)
    output, weights = attention_function(call.attention)(
        call.attention,
        query,
        key,
        value,
        bias.to(query.dtype),
        dropout=settings.dropout if call.attention.training else 0.0,
        scaling=settings.scale,
    )
    output = call.output(output.reshape(rows, length, -1))
    if isinstance(weights, torch.Tensor):
        weights = weights[..., count:, count:]
    return output, weights


def prompted_window_block(call: SwinLayerCall, hidden: torch.Tensor, prompts: torch.Tensor):
    """One Swin block on `[B, H*W, C]` patches with `[B, p, C]` prompts attached to every window of their own sample.
    Returns (prompts out, patches out, patch attention weights)."""
    batch, _, channels = hidden.shape
    count, height, width, window = prompts.shape[1], call.height, call.width, call.window_size
    shortcut = torch.cat([prompts, hidden], dim=1)
    normed = call.norm_before(shortcut)
    normed_prompts, patches = normed[:, :count], normed[:, count:]
    patches, _ = call.pad(patches.reshape(batch, height, width, channels))
    padded_height, padded_width = patches.shape[1], patches.shape[2]
    windows = call.partition(call.shift(patches, False), window).reshape(-1, window * window, channels)
    num_windows = windows.shape[0] // batch
    # windows are batch-major (row b * nW + w): sample b's windows get sample b's prompts
    tokens = torch.cat([normed_prompts.repeat_interleave(num_windows, dim=0), windows], dim=1)
    shift_mask = call.shift_mask(padded_height, padded_width, tokens.dtype, tokens.device)
    attended, weights = window_attention(call, tokens, count, batch, shift_mask)
    prompt_out = attended[:, :count].reshape(batch, num_windows, count, channels).mean(dim=1)
    patch_out = attended[:, count:].reshape(-1, window, window, channels)
    patch_out = call.shift(call.reverse(patch_out, window, padded_height, padded_width), True)
    patch_out = patch_out[:, :height, :width].reshape(batch, height * width, channels)
    # prompts and patches share the residual branch's dropout and (per-sample) drop path, as in one sequence
    hidden = shortcut + call.stochastic_depth(call.dropout(torch.cat([prompt_out, patch_out], dim=1)))
    hidden = hidden + call.dropout(call.mlp(call.norm_after(hidden)))
    return hidden[:, :count], hidden[:, count:], weights


def refuse_checkpointing(tower: WindowedTower) -> None:
    """transformers checkpoints whole Swin stages and replays them in backward, after the forward is over; the prompts
    travel beside the stage's sequence, so a replay would run without them and give wrong gradients."""
    if not torch.is_grad_enabled():
        return
    for block in tower.blocks:
        if block.training and block_uses_gradient_checkpointing(block):
            raise ValueError(
                f"Gradient checkpointing is not supported with VPT on {tower.spec.name}: transformers checkpoints "
                "whole Swin stages and replays them during backward, without the prompts that travel beside the "
                "stage's tokens, which would give wrong gradients. Call `model.gradient_checkpointing_disable()`, "
                "or run this forward under `torch.no_grad()`."
            )


class SwinPromptedLayer(VisualPromptBlock):  # PEFT finds the blocks by the tuner's layer class
    """Wraps one Swin block: runs it with the tower's carried prompts attached to every window and carries the
    prompt outputs on to the next block; the patch sequence keeps its shape."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        tuner, tower = self._tuner, self.tower
        if self.block_index == 0:
            refuse_checkpointing(tower)
            run = tuner._begin_tower_forward(self.tower_index, hidden_states, self.active_adapters)
        else:
            run = tuner._tower_forward_state(self.tower_index)
            if run is None or run.extras.get(PROMPTS) is None:  # called on its own, outside its tower
                return self.base_layer(hidden_states, *args, **kwargs)
        prompts = block_prompts(tuner, run, tower, self.block_index, run.extras.get(PROMPTS), hidden_states.dtype)
        call = swin_layer_call(self.base_layer, args, kwargs)
        prompts, hidden_states, weights = prompted_window_block(call, hidden_states, prompts)
        run.extras[PROMPTS] = prompts
        return hidden_states, weights


def begin_swin_forward(run) -> None:
    run.prompted_length = -1  # nothing the tower returns holds prompt positions: strip nothing
    run.extras[PROMPTS] = None


def on_patch_merging(tuner, tower_index: int, module, args, output):
    """Carry the prompts into the next stage: `[P, P, P, P]` along channels, then the merging's norm and reduction."""
    run = tuner._tower_forward_state(tower_index)
    prompts = None if run is None else run.extras.get(PROMPTS)
    if prompts is not None:
        run.extras[PROMPTS] = swin_merge_features(module, torch.cat([prompts] * 4, dim=-1))


def on_pooler(tuner, tower_index: int, module, args, output):
    """The official readout: the average over all tokens after the final norm, prompts included."""
    run = tuner._tower_forward_state(tower_index)
    prompts = None if run is None else run.extras.get(PROMPTS)
    if prompts is None:
        return output
    tower = tuner._towers[tower_index]
    normed = tower.final_norm(prompts) if tower.final_norm is not None else prompts
    tokens = torch.cat([normed.transpose(1, 2).to(args[0].dtype), args[0]], dim=-1)  # pooler input is [B, C, N]
    return tokens.mean(dim=-1, keepdim=True)
