"""The self-supervised backbone of the digits study: a small ViT pretrained with the MAE objective.

Gated prompt tuning (Yoo et al. 2023) targets self-supervised ViTs such as MAE. To show it at a size a CPU runs,
`ViTMAEForPreTraining` is pretrained on digits 0-4 (masked-patch reconstruction, no labels), and its encoder is
copied into a `ViTForImageClassification`: the MAE encoder and the ViT share every parameter name and shape, as
MAE's own fine-tuning uses a plain ViT. The transfer then reads out as MAE does (the mean over tokens, not CLS):

* prompt methods use `readout="mean_model_norm"`, the gated-prompt code's MAE readout (the mean over every token
  but CLS, prompts included, then the pretrained final norm);
* methods without a readout option (linear probing, full fine-tuning, LoRA, APT) get the same mean over the
  patch tokens through `mean_token_readout`, a pre-hook on the final norm.
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import set_seed
from digits_data import PRETRAIN_CLASSES, digits_loader, pretrain_split, random_affine
from digits_training import fit
from pretrain_cache import cached_pretraining
from torch.utils.data import TensorDataset


def mae_settings(args) -> dict:
    """Everything the MAE backbone depends on; its cache key."""
    return {
        "objective": "mae",
        "image_size": args.image_size,
        "patch_size": args.mae_patch_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "intermediate_size": args.intermediate_size,
        "decoder_hidden_size": args.hidden_size,
        "decoder_num_hidden_layers": 2,
        "mask_ratio": args.mae_mask_ratio,
        "norm_pix_loss": True,
        "pretrain_epochs": args.mae_pretrain_epochs,
        "pretrain_batch_size": args.pretrain_batch_size,
        "pretrain_lr": args.mae_pretrain_lr,
        "pretrain_weight_decay": args.pretrain_weight_decay,
        "pretrain_seed": args.pretrain_seed,
        "augment": "random_affine",
        "loop": "recipes/_common.train_loop",
    }


def _encoder_geometry(settings: dict, num_channels: int) -> dict:
    """The config fields the MAE encoder and the ViT it becomes must share."""
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {"num_channels": num_channels, **{key: settings[key] for key in keys}}


def mae_model(settings: dict, num_channels: int):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        **_encoder_geometry(settings, num_channels),
        decoder_hidden_size=settings["decoder_hidden_size"],
        decoder_num_hidden_layers=settings["decoder_num_hidden_layers"],
        decoder_num_attention_heads=settings["num_attention_heads"],
        decoder_intermediate_size=settings["intermediate_size"],
        mask_ratio=settings["mask_ratio"],
        norm_pix_loss=settings["norm_pix_loss"],
    )
    return ViTMAEForPreTraining(config)


def encoder_as_vit(mae, settings: dict, num_channels: int, pretrain_classes=PRETRAIN_CLASSES):
    """A `ViTForImageClassification` carrying the MAE encoder's weights (identical names and shapes)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **_encoder_geometry(settings, num_channels),
        num_labels=len(pretrain_classes),
        id2label={i: str(c) for i, c in enumerate(pretrain_classes)},
        label2id={str(c): i for i, c in enumerate(pretrain_classes)},
    )
    vit = ViTForImageClassification(config)
    vit.vit.load_state_dict(mae.vit.state_dict(), strict=True)  # fails loudly if the two ever drift apart
    return vit


@torch.no_grad()
def reconstruction_loss(mae, pixels: torch.Tensor, seed: int) -> float:
    """Mean MAE loss over `pixels` with a fixed masking noise, so cached and fresh backbones compare."""
    mae.eval()
    generator = torch.Generator().manual_seed(seed)
    num_patches = mae.vit.embeddings.patch_embeddings.num_patches
    losses = []
    for start in range(0, len(pixels), 256):
        batch = pixels[start : start + 256]
        noise = torch.rand(len(batch), num_patches, generator=generator)
        losses.append(float(mae(pixel_values=batch, noise=noise).loss) * len(batch))
    return sum(losses) / len(pixels)


def _mae_objective(model, pixel_values, labels):
    return model(pixel_values=pixel_values).loss  # the labels ride along in the batch; MAE never reads them


def mae_backbone(args, accelerator, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain with the MAE objective on digits 0-4 (labels unused), or reuse the cached copy."""
    settings = mae_settings(args)

    def pretrain():
        train_idx, held_idx = pretrain_split(labels, args.pretrain_seed)
        set_seed(args.pretrain_seed)
        num_channels = pixels.shape[1]
        mae = mae_model(settings, num_channels)
        initial_loss = reconstruction_loss(mae, pixels[held_idx], args.pretrain_seed)
        decay = [p for p in mae.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in mae.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.pretrain_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.mae_pretrain_lr,
            betas=(0.9, 0.95),  # MAE's pretraining betas
        )
        train = TensorDataset(pixels[train_idx], labels[train_idx])
        mae, seconds, _ = fit(
            accelerator,
            mae,
            optimizer,
            digits_loader(train, args.pretrain_batch_size, True, args.pretrain_seed),
            epochs=args.mae_pretrain_epochs,
            warmup_epochs=args.mae_pretrain_epochs / 20,
            augment=random_affine,
            desc="MAE pretraining on digits 0-4",
            progress=args.progress,
            output_dir=args.output_dir,
            objective=_mae_objective,
        )
        mae = accelerator.unwrap_model(mae)
        info = {
            "pretrain_time_s": seconds,
            "heldout_reconstruction_loss": reconstruction_loss(mae, pixels[held_idx], args.pretrain_seed),
            "heldout_reconstruction_loss_at_init": initial_loss,
        }
        return encoder_as_vit(mae, settings, num_channels), info

    backbone = cached_pretraining(accelerator, args.cache_dir, "digits_vit_mae", settings, pretrain)
    accelerator.free_memory()
    return backbone


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    import hf_vpt

    towers = hf_vpt.find_towers(model)
    norms = [tower.final_norm for tower in towers if tower.final_norm is not None]
    if len(norms) != 1:
        raise ValueError(f"Expected one vision tower with a final norm for the mean readout; found {len(norms)}.")
    return norms[0]


def mean_token_readout(model: torch.nn.Module):
    """MAE's readout for a model without a readout option: the final norm sees, in the CLS slot, the mean of all
    other tokens. Returns the hook handle."""

    def put_mean_in_cls_slot(module, inputs):
        hidden = inputs[0]
        return (torch.cat([hidden[:, 1:].mean(dim=1, keepdim=True), hidden[:, 1:]], dim=1), *inputs[1:])

    return _final_norm(model).register_forward_pre_hook(put_mean_in_cls_slot)


def plot_gates(gate_rows_per_seed: list[list[dict]], path: str, title: str) -> None:
    """Bar chart of the learned gates g_l (mean ± std over seeds) and the temperatures τ_l per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = [row["block"] for row in gate_rows_per_seed[0]]
    gated_blocks = blocks[:-1]  # the last block has no gate
    gates = np.array([[row["gate"] for row in rows[:-1]] for rows in gate_rows_per_seed])
    temps = np.array([[row["temperature"] for row in rows] for rows in gate_rows_per_seed])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    panels = ((axes[0], gated_blocks, gates, "gate g_l = sigmoid(γ_l)"), (axes[1], blocks, temps, "temperature τ_l"))
    for axis, where, values, label in panels:
        axis.bar(where, values.mean(axis=0), yerr=values.std(axis=0), color="tab:blue", capsize=3)
        axis.set_xlabel("block")
        axis.set_ylabel(label)
        axis.set_xticks(blocks)
    axes[0].set_title("last block has no gate", fontsize=9)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
