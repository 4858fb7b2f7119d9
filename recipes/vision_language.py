#!/usr/bin/env python
"""Vision-language prompt tuning of ViLT: APT (`ApproxPromptConfig`) or deep VPT (`VisualPromptConfig`).

Two tasks:

* `--task vqa`: `ViltForQuestionAnswering` (image, question, answers; soft VQA scores `min(1, count / 3)`, BCE loss;
  metric: VQA score of the top answer);
* `--task nlvr2`: `ViltForImagesAndTextClassification` (two images, sentence, label 0/1; metric: accuracy).

Data: a Hub dataset (`--dataset_name`, columns chosen with `--image_column(s)`, `--text_column`, `--answer_column`
/ `--label_column`) or a local JSON file (`--train_file`, a list of records or JSON lines) whose image paths are
relative to `--image_dir`:

    {"image": "a.png", "question": "what color is the square?", "answers": ["red", "red", "orange"]}   # vqa
    {"images": ["a.png", "b.png"], "sentence": "the left image is red", "label": 1}                    # nlvr2

`--tiny` (the default when no data is given) builds a tiny random ViLT from a config, a BERT tokenizer from a small
vocabulary written to a temporary folder and a synthetic coloured-squares dataset: it runs offline in seconds.

    python recipes/vision_language.py                       # tiny, APT, VQA
    python recipes/vision_language.py --task nlvr2 --method vpt_deep
    accelerate launch recipes/vision_language.py --model_name_or_path dandelin/vilt-b32-mlm \
        --dataset_name <vqa dataset> --answer_column answers --max_train_steps 20000
"""

import argparse
import collections
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import set_seed
from peft import get_peft_model
from PIL import Image
from torch.utils.data import DataLoader


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import training  # noqa: E402

import hf_vpt  # noqa: E402  (also registers the methods with PEFT)
from hf_vpt.testing_utils import tiny_vilt  # noqa: E402


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
TINY_WORDS = ["what", "color", "is", "the", "square", "?", "left", "right", "image", "both", "images", "are", "same"]
TINY_WORDS += list(COLOURS)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_IMAGE_SIZE = 32
# The variants that adapt ViLT's joint vision-language transformer (declared with their methods: hf_vpt.registry).
METHODS = tuple(variant.name for variant in hf_vpt.registry.training_variants("vision-language"))


@dataclass
class VisionLanguageArguments:
    task: str = field(default="vqa", metadata={"help": "vqa or nlvr2.", "choices": ["vqa", "nlvr2"]})
    method: str = field(default="apt", metadata={"help": "What trains.", "choices": list(METHODS)})
    num_prompt_tokens: int | None = field(default=None, metadata={"help": "Default: 4 (tiny) or 50."})
    rank: int = field(default=4, metadata={"help": "APT: rank of the key map."})
    tiny: bool = field(
        default=False, metadata={"help": "Tiny random ViLT and synthetic data (also when no data is given)."}
    )
    tiny_train_samples: int = 32
    tiny_eval_samples: int = 16
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ViLT checkpoint (dandelin/vilt-b32-mlm)."}
    )
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    train_file: str | None = field(default=None, metadata={"help": "Local JSON / JSON-lines records."})
    eval_file: str | None = None
    image_dir: str = field(default=".", metadata={"help": "Folder the local image paths are relative to."})
    image_column: str = field(default="image", metadata={"help": "vqa: the image column."})
    image_columns: str = field(default="images", metadata={"help": "nlvr2: one list column, or two comma-separated."})
    text_column: str | None = field(default=None, metadata={"help": "Default: question (vqa) or sentence (nlvr2)."})
    answer_column: str = field(default="answers", metadata={"help": "vqa: a list of answers."})
    label_column: str = field(default="label", metadata={"help": "nlvr2: 0/1 or False/True."})
    max_answers: int = field(default=3129, metadata={"help": "vqa: answer vocabulary size (most frequent)."})
    max_text_length: int | None = field(default=None, metadata={"help": "Default: 16 (tiny) or 40."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class VisionLanguageTrainingArguments(training.TrainingArguments):
    output_dir: str = training.recipe_default("output_dir", "outputs/vision_language")
    per_device_train_batch_size: int = training.recipe_default("per_device_train_batch_size", 4)
    per_device_eval_batch_size: int = training.recipe_default("per_device_eval_batch_size", 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parsed = training.parse_recipe_args(
        (VisionLanguageArguments, VisionLanguageTrainingArguments), argv, "recipes/vision_language.py"
    )
    args = training.merged(*parsed)
    has_data = bool(args.dataset_name or args.train_file)
    args.tiny = args.tiny or not has_data
    if args.tiny and has_data:
        raise SystemExit("--tiny builds its own data; drop --dataset_name / --train_file.")
    if not args.tiny and not args.model_name_or_path:
        raise SystemExit("Real data needs --model_name_or_path (a ViLT checkpoint).")
    args.num_prompt_tokens = args.num_prompt_tokens or (4 if args.tiny else 50)
    args.max_text_length = args.max_text_length or (16 if args.tiny else 40)
    args.text_column = args.text_column or ("question" if args.task == "vqa" else "sentence")
    return args


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def _square_image(rng: np.random.Generator, colour: str) -> Image.Image:
    image = rng.integers(0, 60, size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    size = int(rng.integers(10, 18))
    top, left = (int(v) for v in rng.integers(0, TINY_IMAGE_SIZE - size, size=2))
    image[top : top + size, left : left + size] = COLOURS[colour]
    return Image.fromarray(image)


def tiny_records(task: str, count: int, seed: int) -> list[dict]:
    """Synthetic records: a coloured square per image; VQA asks its colour, NLVR2 states one image's colour."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    records = []
    for _ in range(count):
        if task == "vqa":
            colour = names[int(rng.integers(len(names)))]
            records.append(
                {"image": _square_image(rng, colour), "question": "what color is the square?", "answers": [colour] * 3}
            )
        else:
            left, right = (names[int(i)] for i in rng.integers(len(names), size=2))
            side = "left" if rng.random() < 0.5 else "right"
            claimed = names[int(rng.integers(len(names)))]
            truth = left if side == "left" else right
            records.append(
                {
                    "images": [_square_image(rng, left), _square_image(rng, right)],
                    "sentence": f"the {side} image is {claimed}",
                    "label": int(claimed == truth),
                }
            )
    return records


def _load_image(value, image_dir: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io

        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    path = value.get("path") if isinstance(value, dict) else value
    return Image.open(os.path.join(image_dir, path)).convert("RGB")


def _answers(value) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(item["answer"] if isinstance(item, dict) else item).strip().lower() for item in items]


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_records(args, split: str) -> list[dict]:
    """Records in the recipe's own layout (PIL images) from the Hub, a local JSON file, or the tiny generator."""
    if args.tiny:
        count = args.tiny_train_samples if split == "train" else args.tiny_eval_samples
        return tiny_records(args.task, count, seed=1000 + args.seed + (0 if split == "train" else 1))
    if args.train_file:
        path = args.train_file if split == "train" else args.eval_file
        if path is None:
            return []
        raw = _read_json(path)
    else:
        import datasets

        name = args.train_split if split == "train" else args.eval_split
        try:
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=name)
        except ValueError:
            if split == "train":
                raise
            return []
    limit = args.max_train_samples if split == "train" else args.max_eval_samples
    records = []
    for index, row in enumerate(raw):
        if limit is not None and index >= limit:
            break
        if args.task == "vqa":
            records.append(
                {
                    "image": _load_image(row[args.image_column], args.image_dir),
                    "question": row[args.text_column],
                    "answers": _answers(row[args.answer_column]),
                }
            )
        else:
            columns = args.image_columns.split(",")
            values = row[columns[0]] if len(columns) == 1 else [row[c] for c in columns]
            label = row[args.label_column]
            label = int(label in (True, 1, "True", "true", "1")) if not isinstance(label, int) else int(label)
            records.append(
                {
                    "images": [_load_image(v, args.image_dir) for v in values],
                    "sentence": row[args.text_column],
                    "label": label,
                }
            )
    return records


def answer_vocabulary(records: list[dict], limit: int) -> list[str]:
    counts = collections.Counter(answer for record in records for answer in record["answers"])
    return [answer for answer, _ in counts.most_common(limit)]


def vqa_targets(answers: list[str], label2id: dict[str, int]) -> torch.Tensor:
    """VQA soft scores: `min(1, count / 3)` for every answer in the vocabulary."""
    target = torch.zeros(len(label2id))
    for answer, count in collections.Counter(answers).items():
        if answer in label2id:
            target[label2id[answer]] = min(1.0, count / 3)
    return target


class Collator:
    def __init__(self, args, tokenizer, image_processor, label2id):
        self.args, self.tokenizer, self.image_processor, self.label2id = args, tokenizer, image_processor, label2id

    def __call__(self, records: list[dict]) -> dict:
        texts = [r.get("question") if self.args.task == "vqa" else r.get("sentence") for r in records]
        batch = dict(
            self.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self.args.max_text_length,
                return_tensors="pt",
            )
        )
        if self.args.task == "vqa":
            pixels = self.image_processor([r["image"] for r in records], return_tensors="pt")
            batch.update(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"])
            batch["labels"] = torch.stack([vqa_targets(r["answers"], self.label2id) for r in records])
        else:
            flat = [image for r in records for image in r["images"]]
            pixels = self.image_processor(flat, return_tensors="pt")
            values, mask = pixels["pixel_values"], pixels["pixel_mask"]
            batch["pixel_values"] = values.view(len(records), 2, *values.shape[1:])
            batch["pixel_mask"] = mask.view(len(records), 2, *mask.shape[1:])
            batch["labels"] = torch.tensor([r["label"] for r in records])
        return batch


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
def tiny_tokenizer(folder: str):
    """A BERT-uncased-style WordPiece tokenizer over a small vocabulary (offline)."""
    import transformers

    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(SPECIAL_TOKENS + TINY_WORDS) + "\n")
    return transformers.BertTokenizer(vocab=path, do_lower_case=True)


def build_model_and_processors(args, labels: list[str], workdir: str):
    import transformers

    num_labels = len(labels) if args.task == "vqa" else 2
    id2label = dict(enumerate(labels)) if args.task == "vqa" else {0: "False", 1: "True"}
    label2id = {label: i for i, label in id2label.items()}
    head = (
        transformers.ViltForQuestionAnswering
        if args.task == "vqa"
        else transformers.ViltForImagesAndTextClassification
    )
    if args.tiny:
        tokenizer = tiny_tokenizer(workdir)
        image_processor = transformers.ViltImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE}, size_divisor=TINY_IMAGE_SIZE
        )
        model = tiny_vilt(
            head.__name__,
            vocab_size=len(tokenizer),
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            max_position_embeddings=args.max_text_length,
            num_labels=num_labels,
            id2label=id2label,
            label2id=label2id,
            num_images=2 if args.task == "nlvr2" else -1,
            modality_type_vocab_size=3 if args.task == "nlvr2" else 2,
        )
        model.config._name_or_path = f"tiny-random-{head.__name__}"
    else:
        processor = transformers.ViltProcessor.from_pretrained(args.model_name_or_path)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        extra = {"num_images": 2, "modality_type_vocab_size": 3} if args.task == "nlvr2" else {}
        model = head.from_pretrained(
            args.model_name_or_path,
            num_labels=num_labels,
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            **extra,
        )
    return model, tokenizer, image_processor, label2id


def peft_config(model, args):
    """The registry's config factory of `--method`, with the head trained and saved alongside."""
    variant = training.training_variant(args.method)
    overrides = {"rank": args.rank} if variant.accepts("rank") else {}
    return variant.build_config(
        model, num_prompt_tokens=args.num_prompt_tokens, head_modules=["classifier"], **overrides
    )


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def evaluate_model(accelerator, model, dataloader, task: str) -> dict:
    from hf_vpt.metrics import load_accuracy

    model.eval()
    predictions, references, scores = [], [], []
    with torch.no_grad():
        for batch in dataloader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            top = logits.argmax(-1)
            if task == "vqa":
                scores.extend(labels.gather(1, top[:, None]).squeeze(1).tolist())
                predictions.extend(top.tolist())
                references.extend(labels.argmax(-1).tolist())
            else:
                predictions.extend(top.tolist())
                references.extend(labels.tolist())
    metrics = {"accuracy": load_accuracy().compute(predictions=predictions, references=references)["accuracy"]}
    if task == "vqa":
        metrics["vqa_score"] = float(np.mean(scores)) if scores else 0.0
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = training.make_accelerator(args)
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    train_records = load_records(args, "train")
    eval_records = load_records(args, "eval")
    labels = answer_vocabulary(train_records, args.max_answers) if args.task == "vqa" else []
    with tempfile.TemporaryDirectory() as workdir:
        set_seed(args.seed)
        with training.loading_whole_model(accelerator):
            model, tokenizer, image_processor, label2id = build_model_and_processors(args, labels, workdir)
        base_name = args.model_name_or_path or model.config._name_or_path
        model = get_peft_model(model, peft_config(model, args))
        model.peft_config["default"].base_model_name_or_path = base_name
    trainable = _common.trainable_parameters(model)
    accelerator.print(f"{args.method} on {model.base_model.model.config._name_or_path}: trainable {trainable}")

    collate = Collator(args, tokenizer, image_processor, label2id)
    train_loader = DataLoader(
        train_records,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=training.seeded_generator(args.seed),
    )
    eval_loader = DataLoader(eval_records, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    training.resolve_max_train_steps(args, len(train_loader))
    optimizer = training.make_optimizer(model, args, args.method)
    scheduler = training.make_scheduler(accelerator, optimizer, args)
    model, optimizer, scheduler = training.prepare_for_training(accelerator, args, model, optimizer, scheduler)
    training.init_trackers(accelerator, args, "vision_language")

    def loss_fn(batch):
        return model(**batch).loss

    def evaluate_fn(step):
        return evaluate_model(accelerator, model, eval_loader, args.task) if eval_records else {}

    metrics, step, finished = training.train_loop(
        accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate_fn
    )
    results = {"method": args.method, "task": args.task, "steps": step, **metrics, "trainable parameters": trainable}
    if not finished:
        return results
    folder = os.path.join(args.output_dir, "adapter")
    dataset = "synthetic coloured squares (--tiny)" if args.tiny else (args.dataset_name or args.train_file)
    _common.save_adapter(
        accelerator, model, folder, dataset=dataset, metrics=metrics, command=args.command, trainable=trainable
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(os.path.join(args.output_dir, "processor"))
        image_processor.save_pretrained(os.path.join(args.output_dir, "processor"))
    _common.finish(accelerator, args, folder, results)
    return results


if __name__ == "__main__":
    main()
