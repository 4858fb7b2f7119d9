"""The vision-language, generative-transfer and text-to-image recipes end to end in `--tiny` mode, checkpoint
resume (bit for bit), and `transformers.Trainer` / `pipeline` with a VisualPromptConfig PeftModel."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file

import hf_vpt
from hf_vpt.testing_utils import tiny_vit


RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")
FAST = ["--disable_tqdm", "--report_to", "none"]


def _recipe(name: str):
    if RECIPES not in sys.path:
        sys.path.insert(0, RECIPES)
    return importlib.import_module(name)


def _run(name: str, argv: list[str]) -> dict:
    """`main(argv)` of a recipe in this process, with accelerate's singletons reset as a fresh process has them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return _recipe(name).main(argv)


def _check_card(folder, method: str, base: str, dataset: str, script: str, evaluated: bool = True) -> None:
    card = (folder / "README.md").read_text()
    for text in ("import hf_vpt", method, base, dataset, "trainable parameters", f"python {script}", "- peft"):
        assert text in card, text
    assert "- hf_vpt" in card
    # Only evaluation results go into the metrics table and the Hub's model-index (no step counts).
    assert ("| metric | value |" in card) is evaluated and ("model-index" in card) is evaluated
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()


@pytest.mark.parametrize(("task", "method"), [("vqa", "apt"), ("nlvr2", "vpt_deep")])
def test_vision_language_tiny(tmp_path, task, method):
    out = tmp_path / "out"
    results = _run(
        "vision_language",
        ["--task", task, "--method", method, "--output_dir", str(out), "--max_train_steps", "3", *FAST],
    )
    assert results["steps"] == 3 and 0.0 <= results["accuracy"] <= 1.0
    title = "Approximated Prompt Tuning" if method == "apt" else "Visual Prompt Tuning"
    head = "ViltForQuestionAnswering" if task == "vqa" else "ViltForImagesAndTextClassification"
    _check_card(
        out / "adapter", title, f"tiny-random-{head}", "synthetic coloured squares", "recipes/vision_language.py"
    )
    assert (out / "results.json").is_file() and (out / "processor" / "tokenizer_config.json").is_file()
    # the snippet rebuilds the trained head's labels (the answers; NLVR2's False/True)
    expected = "1: 'True'" if task == "nlvr2" else "'red'"
    card = (out / "adapter" / "README.md").read_text().replace('"', "'")
    assert "id2label={0: " in card and expected in card and "ignore_mismatched_sizes=True" in card


def test_vision_language_resume_is_bit_exact(tmp_path):
    base = ["--max_train_steps", "5", "--checkpointing_steps", "3", "--per_device_train_batch_size", "4", *FAST]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run("vision_language", [*base, "--output_dir", str(straight)])
    stopped = _run("vision_language", [*base, "--output_dir", str(interrupted), "--stop_after_steps", "3"])
    assert stopped["steps"] == 3 and not (interrupted / "adapter").exists()
    assert (interrupted / "checkpoint-3" / "training_state.json").is_file()
    resumed = _run("vision_language", [*base, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 5
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    actual = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert value.dtype == torch.float32 and torch.equal(value, actual[key]), key


def _adapter_tensors(folder) -> dict:
    return {key: value for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")
            for key, value in load_file(folder / name).items()}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "options"), [("generative_transfer", ["--model", "uvit"]), ("text_to_image", ["--eval_steps", "100"])]
)
def test_random_draws_of_the_loss_resume_bit_exact(tmp_path, name, options):
    """MaskGIT masks and diffusion noise/timesteps come from the recipe's own generator, re-seeded per step: a run
    stopped at step 2 (no --checkpointing_steps: the stop itself writes the checkpoint) and resumed from 'latest'
    ends with the adapter of an uninterrupted run, bit for bit."""
    base = ["--max_train_steps", "4", "--per_device_train_batch_size", "4", *options, *FAST]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run(name, [*base, "--output_dir", str(straight)])
    stopped = _run(name, [*base, "--output_dir", str(interrupted), "--stop_after_steps", "2"])
    assert stopped["steps"] == 2 and not (interrupted / "adapter").exists()
    assert sorted(path.name for path in interrupted.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = _run(name, [*base, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 4
    expected, actual = _adapter_tensors(straight / "adapter"), _adapter_tensors(interrupted / "adapter")
    assert expected and sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key


def test_checkpoint_rotation_never_removes_the_checkpoint_just_written(tmp_path, capsys):
    """A later-step checkpoint left in the folder by another run counts among the newest N, but the one written now
    is always kept (and the stale one is named in a warning, since 'latest' would pick it)."""
    from accelerate import Accelerator

    training = _recipe("training")
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    stale = tmp_path / "checkpoint-10"
    stale.mkdir()
    (stale / training.TRAINING_STATE_FILE).write_text('{"step": 10}')
    training.save_checkpoint(accelerator, str(tmp_path), 2, 5, total_limit=1)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    training.save_checkpoint(accelerator, str(tmp_path), 4, 5, total_limit=2)
    stale.mkdir()
    (stale / training.TRAINING_STATE_FILE).write_text('{"step": 10}')
    capsys.readouterr()
    training.save_checkpoint(accelerator, str(tmp_path), 6, 5, total_limit=2)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-6"]
    assert "checkpoint-10" in capsys.readouterr().out


def test_options_from_a_yaml_file_and_shared_flag_names(tmp_path):
    """Every recipe takes its options from one YAML file (transformers' convention) and uses the same names."""
    config = tmp_path / "run.yaml"
    config.write_text("max_train_steps: 7\nlearning_rate: 0.5\nmethod: vpt_deep\nper_device_train_batch_size: 3\n")
    args = _recipe("vision_language").parse_args([str(config)])
    assert (args.max_train_steps, args.learning_rate, args.method, args.tiny) == (7, 0.5, "vpt_deep", True)
    assert args.per_device_train_batch_size == 3 and str(config) in args.command
    shared = ["--model_name_or_path", "m", "--per_device_train_batch_size", "2", "--learning_rate", "0.1",
              "--num_train_epochs", "2", "--lr_scheduler_type", "linear", "--num_warmup_steps", "1", "--tiny"]  # fmt: skip
    for name in ("vision_language", "generative_transfer", "text_to_image"):
        args = _recipe(name).parse_args(shared)
        assert (args.model_name_or_path, args.per_device_train_batch_size, args.learning_rate) == ("m", 2, 0.1), name
        assert (args.num_train_epochs, args.lr_scheduler_type, args.num_warmup_steps) == (2, "linear", 1), name
        assert args.mixed_precision is None  # the launcher decides unless the flag is given
    with pytest.raises(SystemExit):
        _recipe("text_to_image").parse_args(["--pretrained_model_name_or_path", "m"])


def test_num_train_epochs_sets_the_length_unless_max_train_steps_is_given(tmp_path, capsys):
    """Every recipe trains `--num_train_epochs` epochs of its loader when `--max_train_steps` is not given (the
    tiny VQA data: 32 examples, batch 4, so 8 steps an epoch), and `--help` shows each option's help and default."""
    out = tmp_path / "out"
    results = _run("vision_language", ["--num_train_epochs", "1", "--output_dir", str(out), *FAST])
    assert results["steps"] == 8
    for name in ("vision_language", "generative_transfer", "text_to_image"):
        assert _recipe(name).parse_args(["--tiny"]).max_train_steps is None, name
        with pytest.raises(SystemExit):
            _recipe(name).parse_args(["--help"])
        usage = " ".join(capsys.readouterr().out.split())
        assert "Training batch size per device. (default: 4)" in usage, name
        assert "Where the adapter, checkpoints and logs go." in usage, name


def test_scheduler_is_transformers_get_scheduler_and_optimizer_defaults_come_from_the_registry():
    """`make_scheduler` gives exactly transformers' schedule (warm-up from --num_warmup_steps or --warmup_ratio);
    `make_optimizer` takes the variant's registry defaults unless the options say otherwise."""
    from accelerate import Accelerator

    training = _recipe("training")
    accelerator = Accelerator(cpu=True)
    args = training.TrainingArguments(max_train_steps=10, warmup_ratio=0.25, lr_scheduler_type="cosine")
    param = torch.nn.Parameter(torch.zeros(3))
    ours = training.make_scheduler(accelerator, torch.optim.SGD([param], lr=1.0), args)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    reference = transformers.get_cosine_schedule_with_warmup(reference_optimizer, 3, 10)  # ceil(0.25 * 10) = 3
    for _ in range(10):
        assert ours.get_last_lr() == reference.get_last_lr()
        ours.optimizer.step(), ours.step(), reference_optimizer.step(), reference.step()

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    for method in ("vpt_deep", "apt", "linear"):
        variant = hf_vpt.registry.training_variant(method)
        optimizer = training.make_optimizer(model, training.TrainingArguments(), method)
        expected = torch.optim.SGD if variant.optimizer == "sgd" else torch.optim.AdamW
        assert type(optimizer) is expected and optimizer.param_groups[0]["lr"] == variant.learning_rate
        assert optimizer.param_groups[0]["weight_decay"] == variant.weight_decay  # the weight matrix
        assert optimizer.param_groups[1]["weight_decay"] == 0.0  # the bias
    chosen = training.TrainingArguments(optimizer="adamw", learning_rate=0.01, weight_decay=0.5)
    optimizer = training.make_optimizer(model, chosen, "vpt_deep")
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    assert "| a | 0.5000 |" in _recipe("_common").results_table({"a": 0.5})


@pytest.mark.parametrize("model", ["uvit", "imagegpt"])
def test_generative_transfer_tiny(tmp_path, model):
    out = tmp_path / "out"
    results = _run(
        "generative_transfer",
        ["--model", model, "--output_dir", str(out), "--max_train_steps", "2", "--eval_steps", "1", *FAST],
    )
    assert results["steps"] == 2 and 0.0 <= results["class_token_rate"] <= 1.0 and "fid" not in results
    assert sorted(os.listdir(out / "samples")) == ["step-1.png", "step-2.png"]
    assert Image.open(out / "samples" / "step-2.png").size[0] > 0
    base = "tiny-random-UVit2DModel" if model == "uvit" else "tiny-random-ImageGPTForCausalImageModeling"
    _check_card(
        out / "adapter",
        "Generative Visual Prompt Tuning",
        base,
        "synthetic class-labelled tokens",
        "recipes/generative_transfer.py",
    )


def test_text_to_image_tiny(tmp_path):
    out = tmp_path / "out"
    results = _run("text_to_image", ["--output_dir", str(out), "--max_train_steps", "2", *FAST])
    assert results["steps"] == 2
    assert sorted(os.listdir(out / "samples")) == ["step-2-0.png", "step-2-1.png"]
    _check_card(
        out / "adapter",
        "Approximated Prompt Tuning",
        "tiny-random-stable-diffusion",
        "synthetic captioned squares",
        "recipes/text_to_image.py",
        evaluated=False,
    )
    # the saved adapter loads onto a fresh tiny pipeline
    recipe = _recipe("text_to_image")
    pipe = recipe.tiny_pipeline(str(tmp_path))
    model = hf_vpt.load_text_encoder_adapter(pipe, str(out / "adapter"))
    assert isinstance(model, PeftModel) and pipe.text_encoder is model


def _tiny_vit():
    torch.manual_seed(0)
    labels = {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    return tiny_vit(num_labels=3, image_size=16, patch_size=4, num_hidden_layers=2, **labels)


def test_trainer_and_image_classification_pipeline(tmp_path):
    model = get_peft_model(
        _tiny_vit(), hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="shallow", modules_to_save=["classifier"])
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    train = [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(8)]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "trainer"),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=0.5,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
        ),
        train_dataset=train,
    )
    trainer.train()
    after = dict(model.named_parameters())
    prompt_keys = [k for k in before if "_bank" in k or "prompt" in k.lower()]
    assert prompt_keys and any(not torch.equal(before[k], after[k]) for k in prompt_keys)
    frozen = [k for k, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)

    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    model.eval()
    classifier = transformers.pipeline("image-classification", model=model, image_processor=processor)
    predictions = classifier(image, top_k=3)
    assert sorted(p["label"] for p in predictions) == ["a", "b", "c"]
    with torch.no_grad():
        expected = model(pixel_values=processor(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    best = max(predictions, key=lambda p: p["score"])
    assert best["label"] == "abc"[int(expected.argmax())]
    assert best["score"] == pytest.approx(float(expected.max()), abs=1e-5)
