"""The self-supervised backbone of the embedded digits experiment: a small ViT pretrained with the MAE objective.

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

import hashlib
import json
import os
import shutil
import tempfile
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import TensorDataset
from transformers import get_cosine_schedule_with_warmup


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
    }


def _encoder_geometry(settings: dict, num_channels: int) -> dict:
    """The config fields the MAE encoder and the ViT it becomes must share."""
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {"num_channels": num_channels, **{key: settings[key] for key in keys}}


def _mae_model(settings: dict, num_channels: int):
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


def _encoder_as_vit(mae, settings: dict, num_channels: int, pretrain_classes):
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
def _reconstruction_loss(mae, pixels: torch.Tensor, seed: int) -> float:
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


def get_mae_backbone(args, accelerator: Accelerator, pixels, labels, *, pretrain_split, loader, augment, classes):
    """Pretrain with the MAE objective on digits 0-4 (labels unused), or reuse the cached copy."""
    settings = mae_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(args.cache_dir, f"digits_vit_mae_{key}")
    info_path = os.path.join(folder, "pretraining.json")
    accelerator.wait_for_everyone()  # every process decides before the main one may write the cache
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        return {"path": folder, "reused": True, **info}

    train_idx, held_idx = pretrain_split(labels, args.pretrain_seed)
    set_seed(args.pretrain_seed)
    num_channels = pixels.shape[1]
    mae = _mae_model(settings, num_channels)
    initial_loss = _reconstruction_loss(mae, pixels[held_idx], args.pretrain_seed)
    decay = [p for p in mae.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in mae.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.pretrain_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.mae_pretrain_lr,
        betas=(0.9, 0.95),  # MAE's pretraining betas
    )
    # The labels ride along only because the loader expects pairs; the MAE objective never reads them.
    train = loader(TensorDataset(pixels[train_idx], labels[train_idx]), args.pretrain_batch_size, True)
    mae, optimizer, train = accelerator.prepare(mae, optimizer, train)
    total = args.mae_pretrain_epochs * len(train)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total // 20), total)
    start = time.perf_counter()
    mae.train()
    for epoch in range(args.mae_pretrain_epochs):
        for batch in train:
            loss = mae(pixel_values=augment(batch["pixel_values"])).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MAE pretraining: the loss became {loss.item()}; lower --mae_pretrain_lr.")
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.is_main_process and (epoch + 1) % max(1, args.mae_pretrain_epochs // 5) == 0:
            accelerator.print(f"MAE pretraining epoch {epoch + 1}/{args.mae_pretrain_epochs}: loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    mae = accelerator.unwrap_model(mae)
    info = {
        "pretrain_time_s": seconds,
        "heldout_reconstruction_loss": _reconstruction_loss(mae, pixels[held_idx], args.pretrain_seed),
        "heldout_reconstruction_loss_at_init": initial_loss,
        "settings": settings,
    }
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".digits_vit_mae_", dir=args.cache_dir)
        _encoder_as_vit(mae, settings, num_channels, classes).save_pretrained(staging)
        with open(os.path.join(staging, "pretraining.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return {"path": folder, "reused": False, **info}


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
