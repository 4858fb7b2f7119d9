"""The two frozen backbones of the digits study, pretrained in the run on digits 0-4 and cached.

* `supervised`: a small ViT trained to classify digits 0-4 (`supervised_backbone`);
* `mae`: the same geometry trained with the MAE objective, no labels (`digits_mae.mae_backbone`).

Both go through `pretrain_cache.cached_pretraining` (one cache entry per set of settings) and both train with the
recipes' loop (`training.fit`).
"""

from __future__ import annotations

import torch
from accelerate.utils import set_seed
from digits_data import PRETRAIN_CLASSES, TRANSFER_CLASSES, digits_loader, pretrain_split, random_affine
from digits_training import evaluate, fit
from pretrain_cache import cached_pretraining
from torch.utils.data import TensorDataset


def supervised_settings(args) -> dict:
    """Everything the supervised backbone depends on: its cache key."""
    return {
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "intermediate_size": args.intermediate_size,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_batch_size": args.pretrain_batch_size,
        "pretrain_lr": args.pretrain_lr,
        "pretrain_weight_decay": args.pretrain_weight_decay,
        "pretrain_seed": args.pretrain_seed,
        "classes": list(PRETRAIN_CLASSES),
        "augment": "random_affine",
        "loop": "recipes/_common.train_loop",  # the loop changed the random stream: a new key, a new backbone
    }


def pretrain_classifier(args, accelerator, model, pixels: torch.Tensor, labels: torch.Tensor, desc: str):
    """Train `model` (freshly built after `set_seed(args.pretrain_seed)`) to classify digits 0-4 with the study's
    pretraining settings (AdamW, no decay on biases and norms, warm-up then cosine, random affine augmentation);
    returns (the trained model, {"heldout_accuracy", "pretrain_time_s"}) as `cached_pretraining` wants them."""
    train_idx, held_idx = pretrain_split(labels, args.pretrain_seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.pretrain_weight_decay},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=args.pretrain_lr,
    )
    train = TensorDataset(pixels[train_idx], labels[train_idx])
    model, seconds, _ = fit(
        accelerator,
        model,
        optimizer,
        digits_loader(train, args.pretrain_batch_size, True, args.pretrain_seed),
        epochs=args.pretrain_epochs,
        warmup_epochs=max(1, args.pretrain_epochs // 10),
        augment=random_affine,
        desc=desc,
        progress=args.progress,
        output_dir=args.output_dir,
    )
    held_out = digits_loader(TensorDataset(pixels[held_idx], labels[held_idx]), args.eval_batch_size, False)
    info = {"heldout_accuracy": evaluate(accelerator, model, held_out), "pretrain_time_s": seconds}
    return accelerator.unwrap_model(model), info


def supervised_backbone(args, accelerator, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain the small ViT on digits 0-4 (held-out accuracy recorded), or reuse the cached copy."""
    from transformers import ViTConfig, ViTForImageClassification

    settings = supervised_settings(args)

    def pretrain():
        set_seed(args.pretrain_seed)
        config = ViTConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_channels=1,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            intermediate_size=args.intermediate_size,
            num_labels=len(PRETRAIN_CLASSES),
            id2label={i: str(c) for i, c in enumerate(PRETRAIN_CLASSES)},
            label2id={str(c): i for i, c in enumerate(PRETRAIN_CLASSES)},
        )
        model = ViTForImageClassification(config)
        return pretrain_classifier(args, accelerator, model, pixels, labels, "pretrain ViT on digits 0-4")

    backbone = cached_pretraining(accelerator, args.cache_dir, "digits_vit", settings, pretrain)
    accelerator.free_memory()
    return backbone


def load_transfer_model(backbone_path: str):
    """The cached backbone with a fresh 5-way head for digits 5-9 (the 0-4 head is dropped)."""
    import transformers
    from transformers import ViTForImageClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head-size mismatch is intended
    try:
        return ViTForImageClassification.from_pretrained(
            backbone_path,
            num_labels=len(TRANSFER_CLASSES),
            id2label={i: str(c) for i, c in enumerate(TRANSFER_CLASSES)},
            label2id={str(c): i for i, c in enumerate(TRANSFER_CLASSES)},
            ignore_mismatched_sizes=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
