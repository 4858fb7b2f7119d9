"""The transfer experiments of the digits study: every method on every seed from one frozen backbone, the table,
the saved adapters with their cards, the gate plot, and the k-fold learning-rate search inside the shots."""

from __future__ import annotations

import os

import digits_mae
import numpy as np
from accelerate.utils import set_seed
from digits_backbones import load_transfer_model
from digits_data import TRANSFER_CLASSES, digits_loader, few_shot_split, random_affine
from digits_training import count_trainable, evaluate, fit, make_optimizer, optimizer_name, prepare_for_method
from torch.utils.data import TensorDataset

import hf_vpt
from hf_vpt.registry import training_variant


# Learning-rate grids of `--tune` (SGD for the head and the VPT family, AdamW for the others).
SGD_LR_GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ADAMW_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
ADAPTER_ADAMW_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # APT and LoRA train few parameters: larger steps than full
TUNE_GRIDS = {"full": ADAMW_LR_GRID, "apt": ADAPTER_ADAMW_LR_GRID, "lora": ADAPTER_ADAMW_LR_GRID}
READOUT_METHODS = ("vpt_shallow", "vpt_deep", "gated")  # configs with a `readout` field


def learning_rate(args, method: str, backbone_kind: str = "supervised") -> float:
    """`--lr_<method>`, or on the MAE backbone the `--mae_lrs` entry of the method where there is one."""
    if backbone_kind == "mae" and method in args.mae_lrs:
        return args.mae_lrs[method]
    return getattr(args, f"lr_{method}")


def optimizer_title(args, method: str) -> str:
    return f"SGD (momentum {args.momentum})" if optimizer_name(method) == "sgd" else "AdamW"


def train_one(args, accelerator, method, lr, backbone_path, train_set, eval_set, seed, desc, readout="cls"):
    """One transfer run: fresh head (and adapter) from `seed`, train, evaluate.

    `readout="mean"` is MAE's readout (see digits_mae.py): the prompt configs get `readout="mean_model_norm"`,
    every other method a mean-token hook on the final norm."""
    set_seed(seed)
    model = load_transfer_model(backbone_path)
    if readout == "mean" and method not in READOUT_METHODS:
        digits_mae.mean_token_readout(model)
    model = prepare_for_method(model, method, args, readout="mean_model_norm" if readout == "mean" else "default")
    trainable = count_trainable(model)
    optimizer = make_optimizer(model, method, lr, args)
    model, seconds, cpu_seconds = fit(
        accelerator,
        model,
        optimizer,
        digits_loader(train_set, args.batch_size, True, seed),
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        augment=random_affine if args.augment else None,
        desc=desc,
        progress=args.progress,
        output_dir=args.output_dir,
    )
    accuracy = evaluate(accelerator, model, digits_loader(eval_set, args.eval_batch_size, False))
    return {
        "model": model,
        "accuracy": accuracy,
        "trainable": trainable,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def save_adapter(args, accelerator, model, folder: str, *, seed: int, accuracy: float) -> None:
    """`save_pretrained` (adapter + hf_vpt model card), with the study's dataset and result on the card."""
    from hf_vpt.hub import write_model_card

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder)
        total = sum(p.numel() for p in unwrapped.parameters())
        trainable = count_trainable(unwrapped)
        write_model_card(
            folder,
            unwrapped.peft_config["default"],
            dataset=f"scikit-learn digits 5-9, {args.shots} shots per class, seed {seed}",
            metrics={"test accuracy": round(float(accuracy), 6)},  # a number: the Hub reads it from model-index
            command=args.command,
            trainable_parameters=f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
            task="image-classification",
            num_labels=len(TRANSFER_CLASSES),
            labels=[str(c) for c in TRANSFER_CLASSES],
        )
    accelerator.wait_for_everyone()


def format_table(rows: list[dict]) -> str:
    lines = [
        "| method | test accuracy (mean ± std) | trainable parameters | train time (s) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['title']} | {100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} % "
            f"| {row['trainable_parameters']:,} | {row['train_time_s_mean']:.1f} |"
        )
    return "\n".join(lines)


def experiment_dir(args, kind: str) -> str:
    """Adapters and plots of the supervised backbone go to `--output_dir`, the others to a sub-folder."""
    return args.output_dir if kind == "supervised" else os.path.join(args.output_dir, kind)


def transfer_experiment(args, accelerator, backbone: dict, methods, pixels, labels, seeds) -> dict:
    """Few-shot transfer to digits 5-9 from one frozen backbone: every method on every seed, then the table.

    The first seed's adapters are saved (with their model cards) to `experiment_dir`."""
    log = accelerator.print
    kind = backbone["kind"]
    readout = "mean" if kind == "mae" else "cls"
    transfer_labels = labels - TRANSFER_CLASSES[0]
    runs = {method: [] for method in methods}
    adapters, gates = {}, []
    out_dir = experiment_dir(args, kind)
    for seed in seeds:
        train_idx, test_idx = few_shot_split(labels, args.shots, seed)
        train_set = TensorDataset(pixels[train_idx], transfer_labels[train_idx])
        test_set = TensorDataset(pixels[test_idx], transfer_labels[test_idx])
        for method in methods:
            lr = learning_rate(args, method, kind)
            result = train_one(
                args,
                accelerator,
                method,
                lr,
                backbone["path"],
                train_set,
                test_set,
                seed,
                f"{kind} {method} seed {seed}",
                readout=readout,
            )
            runs[method].append(result)
            log(
                f"{kind} seed {seed} {method:<12} test accuracy {100 * result['accuracy']:.2f} % ({result['seconds']:.1f} s)"
            )
            if method == "gated":
                gates.append(hf_vpt.gate_values(accelerator.unwrap_model(result["model"])))
            if training_variant(method).trains == "adapter" and seed == seeds[0]:
                folder = os.path.join(out_dir, method)
                save_adapter(args, accelerator, result["model"], folder, seed=seed, accuracy=result["accuracy"])
                adapters[method] = {"path": folder, "model": accelerator.unwrap_model(result["model"]), "seed": seed}
            result["model"] = None
            accelerator.free_memory()

    rows = []
    for method, results in runs.items():
        accuracies = [r["accuracy"] for r in results]
        rows.append(
            {
                "method": method,
                "title": training_variant(method).title,
                "optimizer": optimizer_title(args, method),
                "learning_rate": learning_rate(args, method, kind),
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                "accuracies": accuracies,
                "trainable_parameters": results[0]["trainable"],
                "train_time_s_mean": float(np.mean([r["seconds"] for r in results])),
                "train_cpu_time_s_mean": float(np.mean([r["cpu_seconds"] for r in results])),
                "adapter_path": adapters.get(method, {}).get("path"),
            }
        )
    table = format_table(rows)
    num_test = len(few_shot_split(labels, args.shots, seeds[0])[1])
    readout_note = "CLS readout" if readout == "cls" else "MAE readout: mean over tokens, then the pretrained norm"
    log(
        f"\nDigits 0-4 -> 5-9 transfer from the {kind} backbone ({readout_note}), {args.shots} shots per class, "
        f"{num_test} test images, seeds {seeds}, {args.epochs} epochs, {args.num_prompt_tokens} prompt tokens "
        "(std over seeds, ddof=1):\n"
    )
    log(table)
    summary = {
        "experiment": f"digits 0-4 -> 5-9, {kind} backbone",
        "backbone": dict(backbone),
        "readout": readout,
        "seeds": seeds,
        "num_test_images": num_test,
        "results": rows,
        "table": table,
        "adapters": adapters,
    }
    if gates:
        summary["gates"] = gates
        if accelerator.is_main_process:
            plot = os.path.join(out_dir, "gates.png")
            digits_mae.plot_gates(
                gates, plot, f"gated prompts, {kind} backbone: learned gates over {len(gates)} seeds"
            )
            summary["gate_plot"] = plot
            log(f"wrote the gate plot {plot}")
    return summary


def tune(args, accelerator, backbone, methods, pixels, labels, seeds) -> dict:
    """k-fold cross-validation inside each seed's few-shot training set; the test digits are never used."""
    from sklearn.model_selection import StratifiedKFold

    transfer_labels = labels - TRANSFER_CLASSES[0]
    readout = "mean" if backbone["kind"] == "mae" else "cls"
    scores = {}
    for method in methods:
        grid = args.tune_lrs or TUNE_GRIDS.get(method, SGD_LR_GRID)
        for lr in grid:
            accuracies = []
            for seed in seeds:
                train_idx, _ = few_shot_split(labels, args.shots, seed)
                folds = StratifiedKFold(n_splits=args.tune_folds, shuffle=True, random_state=seed)
                for fit_part, val_part in folds.split(train_idx, labels[train_idx].numpy()):
                    fit_set = TensorDataset(pixels[train_idx[fit_part]], transfer_labels[train_idx[fit_part]])
                    val_set = TensorDataset(pixels[train_idx[val_part]], transfer_labels[train_idx[val_part]])
                    result = train_one(
                        args,
                        accelerator,
                        method,
                        lr,
                        backbone["path"],
                        fit_set,
                        val_set,
                        seed,
                        f"tune {method}",
                        readout=readout,
                    )
                    accuracies.append(result["accuracy"])
                    accelerator.free_memory()
            scores[(method, lr)] = float(np.mean(accuracies))
            accelerator.print(
                f"tune {method:<12} lr {lr:<8g} cross-validated accuracy {100 * scores[(method, lr)]:.2f} %"
            )
    best = {}
    for method in methods:
        candidates = [(acc, -lr) for (m, lr), acc in scores.items() if m == method]
        acc, neg_lr = max(candidates)  # ties go to the smaller learning rate, as VPT's tuning scripts do
        best[method] = {"lr": -neg_lr, "cv_accuracy": acc}
        accelerator.print(f"best {method:<12} --lr_{method} {-neg_lr:g} ({100 * acc:.2f} %)")
    return {
        "experiment": f"digits 0-4 -> 5-9, {backbone['kind']} backbone, learning-rate tuning",
        "backbone": dict(backbone),
        "folds": args.tune_folds,
        "seeds": seeds,
        "scores": [{"method": m, "lr": lr, "cv_accuracy": acc} for (m, lr), acc in scores.items()],
        "best": best,
    }
