#!/usr/bin/env python
"""Adapt a frozen pretrained image classifier to your images with prompt tuning (or a baseline), with accelerate.

    accelerate launch recipes/image_classification.py \\
        --model_name_or_path google/vit-base-patch16-224-in21k \\
        --train_dir path/to/images --method vpt_deep --output_dir vit-vpt-deep

`--train_dir` (and optionally `--validation_dir`) is an imagefolder, one sub-folder per class; `--dataset_name` a
`datasets` dataset instead. Without a validation split, `--train_val_split` of the training images are held out.

`--method` is a training variant of `hf_vpt.registry`: linear probing (`linear`), VPT-shallow / VPT-deep, gated
prompts (`gated`), APT (`apt`), LoRA (`lora`) or full fine-tuning (`full`). Its optimiser, learning rate and weight
decay are the registry's defaults for that method unless `--optimizer`, `--learning_rate`, `--weight_decay` say
otherwise; `python -c "import hf_vpt; print(hf_vpt.registry.training_variant('vpt_deep'))"` shows them and where
they were measured.

The result (in `--output_dir`): the adapter (`adapter_model.safetensors`, `adapter_config.json`, a model card) that
`PeftModel.from_pretrained(base_model, output_dir)` loads, or the whole model for `linear` and `full`, the image
processor, and `all_results.json`. `--checkpointing_steps N` writes `checkpoint-<step>` folders with the trainable
tensors, optimiser, schedule, RNG and data position; `--resume_from_checkpoint latest` continues bit for bit.

All options can also come from one `.json` or `.yaml` file: `python recipes/image_classification.py args.yaml`.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import training  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT)
from hf_vpt.metrics import load_accuracy  # noqa: E402
from hf_vpt.registry import training_variant, training_variants  # noqa: E402


SCRIPT = "recipes/image_classification.py"
METHODS = tuple(variant.name for variant in training_variants("image-classification"))


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A Hub model id or a local folder of an image classifier (and its image processor)."}
    )
    method: str = field(default="vpt_deep", metadata={"help": "What trains.", "choices": list(METHODS)})
    num_prompt_tokens: int = field(
        default=10, metadata={"help": "Prompt tokens of VPT and gated prompts; prompts per layer of APT."}
    )
    prompt_dropout: float | None = field(
        default=None, metadata={"help": "Dropout on the prompt tokens (VPT, gated). Default: the config's."}
    )
    head_module: str = field(default="classifier", metadata={"help": "Name of the classification head module."})
    random_flip: bool = field(default=False, metadata={"help": "Mirror training images left-right at random."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset (Hub id or script)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder of training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder of validation images."})
    image_column_name: str = field(default="image", metadata={"help": "The column of the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column of the labels."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training images held out when there is no validation split."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Side of the square model input. Default: the image processor's size."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation images."})


@dataclass
class ImageClassificationTrainingArguments(training.TrainingArguments):
    output_dir: str = field(default="outputs/image_classification", metadata={"help": "Where the adapter goes."})
    # Batch 32, 10 epochs, one of them warm-up: the protocol the registry's learning rates were measured with
    # (bench/recipe_defaults.py); 3 epochs left VPT-deep well short of linear probing on the real ViT-Ti.
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    num_train_epochs: int = field(default=10, metadata={"help": "Epochs, unless --max_train_steps is given."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warm-up as a fraction of the training steps (default: one of 10 epochs)."}
    )


def parse_args(argv=None):
    parser_types = (ModelArguments, DataArguments, ImageClassificationTrainingArguments)
    model_args, data_args, train_args = training.parse_recipe_args(parser_types, argv, SCRIPT)
    problems = []
    if not (data_args.dataset_name or data_args.train_dir):
        problems.append("give your images with --train_dir (an imagefolder) or --dataset_name")
    if data_args.dataset_name and (data_args.train_dir or data_args.validation_dir):
        problems.append("give either --dataset_name or --train_dir/--validation_dir, not both")
    if not 0.0 < data_args.train_val_split < 1.0:
        problems.append(f"--train_val_split must be in (0, 1); got {data_args.train_val_split}")
    for name, value in (("num_prompt_tokens", model_args.num_prompt_tokens), ("image_size", data_args.image_size)):
        if value is not None and value < 1:
            problems.append(f"--{name} must be a positive integer; got {value}")
    if model_args.prompt_dropout is not None and not training_variant(model_args.method).accepts("prompt_dropout"):
        problems.append(f"--prompt_dropout applies to VPT and gated prompts, not --method {model_args.method}")
    if problems:
        raise SystemExit(f"{SCRIPT}: error: " + "; ".join(problems) + ".")
    return model_args, data_args, train_args


def load_image_dataset(data_args, seed: int):
    """The train and validation splits (imagefolder or `datasets`), and the class names."""
    from datasets import ClassLabel, load_dataset

    if data_args.dataset_name:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        # Labels from the class sub-folders even when the train and validation folders have different parents
        # (datasets only infers them by itself when every file shares one layout under a common root).
        dataset = load_dataset("imagefolder", data_files=files, drop_labels=False)
    train = dataset["train"]
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in train.column_names:
            raise ValueError(f"The dataset has no column {column!r} (it has {train.column_names}); pass its name.")
    label = train.features[data_args.label_column_name]
    if not isinstance(label, ClassLabel):
        raise ValueError(f"Column {data_args.label_column_name!r} holds {label}, not class labels (ClassLabel).")
    if "validation" in dataset:
        validation = dataset["validation"]
    else:
        split = train.train_test_split(
            test_size=data_args.train_val_split, seed=seed, stratify_by_column=data_args.label_column_name
        )
        train, validation = split["train"], split["test"]
    if data_args.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    return train, validation, list(label.names)


def processor_size(processor, config) -> int:
    size = getattr(processor, "size", None) or {}
    size = dict(size.items()) if hasattr(size, "items") else {}
    side = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", None)
    if not side:
        raise ValueError("Cannot tell the model's input size from its image processor or config; pass --image_size.")
    return int(side)


def apply_method(model, model_args):
    """Make only what `--method` trains trainable: the head (linear), everything (full), or an adapter built by the
    registry's config factory (the head trains and is saved with it)."""
    from peft import get_peft_model

    variant = training_variant(model_args.method)
    if not hasattr(model, model_args.head_module):
        raise ValueError(f"{type(model).__name__} has no module {model_args.head_module!r}; pass --head_module.")
    if variant.trains == "all":
        return model.requires_grad_(True)
    if variant.trains == "head":
        model.requires_grad_(False)
        getattr(model, model_args.head_module).requires_grad_(True)
        return model
    overrides = {} if model_args.prompt_dropout is None else {"prompt_dropout": model_args.prompt_dropout}
    config = variant.build_config(
        model, num_prompt_tokens=model_args.num_prompt_tokens, head_modules=[model_args.head_module], **overrides
    )
    return get_peft_model(model, config)


def main(argv=None) -> dict:
    model_args, data_args, args = parse_args(argv)
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    accelerator = training.make_accelerator(args)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    with accelerator.main_process_first():  # the first process prepares the dataset cache
        train_dataset, eval_dataset, labels = load_image_dataset(data_args, args.seed)
    # A chosen --image_size goes into the processor, so that the saved one preprocesses as training did.
    size = {"size": {"height": data_args.image_size, "width": data_args.image_size}} if data_args.image_size else {}
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **size)
    with training.loading_whole_model(accelerator):
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a new head for these classes
        )
    image_size = data_args.image_size or processor_size(processor, model.config)
    # ViTs made for another input size interpolate their position embeddings.
    native = getattr(model.config, "image_size", image_size)
    forward_kwargs = {"interpolate_pos_encoding": True} if image_size != native else {}
    model = apply_method(model, model_args)
    trainable = _common.trainable_parameters(model)
    hyper = training.resolved_hyperparameters(args, model_args.method)
    accelerator.print(
        f"{model_args.method}: {trainable} parameters train; {hyper['optimizer']} lr {hyper['learning_rate']:g} "
        f"weight decay {hyper['weight_decay']:g}; {len(train_dataset)} train / {len(eval_dataset)} validation images"
    )

    def transform(batch):
        # Deterministic preprocessing only: random augmentation happens in the training step (`random_flip`), where
        # its random numbers are part of the checkpointed RNG state (the loader fetches a batch ahead).
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        pixels = processor(images, size={"height": image_size, "width": image_size}, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "labels": batch[data_args.label_column_name]}

    def collate(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    train_loader = DataLoader(
        train_dataset.with_transform(transform),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=training.seeded_generator(args.seed),
    )
    eval_loader = DataLoader(
        eval_dataset.with_transform(transform), batch_size=args.per_device_eval_batch_size, collate_fn=collate
    )
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    training.resolve_max_train_steps(args, len(train_loader))
    optimizer = training.make_optimizer(model, args, model_args.method)
    scheduler = training.make_scheduler(accelerator, optimizer, args)
    model, optimizer, scheduler = training.prepare_for_training(accelerator, args, model, optimizer, scheduler)
    training.init_trackers(accelerator, args, "image_classification")

    def loss_fn(batch):
        pixels = batch["pixel_values"]
        if model_args.random_flip:
            flip = torch.rand(pixels.shape[0], device=pixels.device) < 0.5
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return model(pixel_values=pixels, labels=batch["labels"], **forward_kwargs).loss

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        model.eval()
        metric = load_accuracy()
        for batch in eval_loader:
            predictions = model(pixel_values=batch["pixel_values"], **forward_kwargs).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            metric.add_batch(predictions=predictions.tolist(), references=references.tolist())
        accuracy = float(metric.compute()["accuracy"])
        accelerator.print(f"step {step}: validation accuracy {100 * accuracy:.2f} %")
        return {"accuracy": accuracy}

    metrics, step, finished = training.train_loop(
        accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate, desc=model_args.method
    )
    summary = {"steps": step, "finished": finished, "mixed_precision": accelerator.mixed_precision}
    if not finished:
        accelerator.end_training()
        return summary

    dataset = data_args.dataset_name or data_args.train_dir
    _common.save_adapter(
        accelerator,
        model,
        args.output_dir,
        dataset=dataset,
        metrics={"accuracy": metrics["accuracy"]},  # a number (0 to 1): the card's model-index lists only numbers
        command=args.command,
        trainable=trainable,
        task="image-classification",
        num_labels=len(labels),
        labels=labels,
    )
    results = {
        "eval_accuracy": metrics["accuracy"],
        "method": model_args.method,
        **hyper,
        "train_steps": step,
        "trainable_parameters": trainable,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
    }
    if accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        print(_common.results_table(results))
        if args.push_to_hub:
            repo_id = _common.push_folder_to_hub(
                args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo
            )
            print(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")
    accelerator.end_training()
    return {**summary, **results, "model": accelerator.unwrap_model(model)}


if __name__ == "__main__":
    main()
