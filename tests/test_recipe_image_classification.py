"""The image-classification recipe end to end, drastically shrunk: tiny pretraining, one seed, a few epochs."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT before loading)


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "image_classification.py"
sys.path.insert(0, str(RECIPE.parent))  # the recipe's own modules (digits_mae)
HIDDEN, LAYERS, TOKENS, CLASSES = 32, 2, 3, 5
TINY = [
    "--backbones", "supervised",
    "--hidden_size", str(HIDDEN),
    "--num_hidden_layers", str(LAYERS),
    "--intermediate_size", "64",
    "--pretrain_epochs", "2",
    "--shots", "4",
    "--epochs", "3",
    "--warmup_epochs", "1",
    "--num_seeds", "1",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_image_classification", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reload_and_compare(trained, folder, base):
    assert os.path.isfile(os.path.join(folder, "adapter_config.json"))
    assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "README.md"))
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    trained = trained.eval()
    size = base.config.image_size
    pixels = torch.randn(4, base.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(pixel_values=pixels).logits
        got = reloaded(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_digits_experiment(recipe, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"num_prompt_tokens: {TOKENS}\nmethods: [linear, vpt_shallow, vpt_deep, full]\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [*TINY, "--config", str(config), "--output_dir", str(out), "--cache_dir", str(cache)]
    summary = recipe.main(argv)

    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["linear", "vpt_shallow", "vpt_deep", "full"]
    for row in rows.values():
        assert len(row["accuracies"]) == 1
        assert math.isfinite(row["accuracy_mean"]) and 0.0 <= row["accuracy_mean"] <= 1.0
        assert row["train_time_s_mean"] > 0
        assert row["title"] in data["table"]

    head = HIDDEN * CLASSES + CLASSES
    counts = {method: row["trainable_parameters"] for method, row in rows.items()}
    assert counts["linear"] == head
    assert counts["vpt_shallow"] == head + TOKENS * HIDDEN
    assert counts["vpt_deep"] == head + LAYERS * TOKENS * HIDDEN
    assert counts["linear"] < counts["vpt_shallow"] < counts["vpt_deep"] < counts["full"]

    backbone = data["backbone"]
    assert not backbone["reused"] and 0.0 <= backbone["heldout_accuracy"] <= 1.0
    for method in ("vpt_shallow", "vpt_deep"):
        folder = str(out / method)
        saved = json.loads((out / method / "adapter_config.json").read_text())
        assert saved["depth"] == method.split("_")[1] and saved["num_prompt_tokens"] == TOKENS
        assert saved["modules_to_save"] == ["classifier"]
        _reload_and_compare(summary["adapters"][method]["model"], folder, recipe.load_transfer_model(backbone["path"]))

    # A second run with the same pretraining settings reuses the cached backbone.
    again = recipe.main([*argv, "--methods", "linear", "--output_dir", str(tmp_path / "again")])
    assert again["backbone"]["reused"] and again["backbone"]["path"] == backbone["path"]
    assert again["backbone"]["heldout_accuracy"] == pytest.approx(backbone["heldout_accuracy"])


def _card_snippet(folder) -> str:
    card = (Path(folder) / "README.md").read_text()
    return card.split("## Use it\n\n```python\n", 1)[1].split("```", 1)[0]


def test_gated_apt_and_lora_on_digits(recipe, tmp_path):
    """The opt-in methods run end to end, with their paper optimisers, and their adapters load back bit-exactly."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [*TINY, "--num_prompt_tokens", str(TOKENS), "--methods", "gated,apt,lora", "--output_dir", str(out)]
    summary = recipe.main([*argv, "--cache_dir", str(cache)])

    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["gated", "apt", "lora"]
    assert rows["gated"]["optimizer"].startswith("SGD") and rows["gated"]["learning_rate"] == 1.0
    assert rows["apt"]["optimizer"] == rows["lora"]["optimizer"] == "AdamW"
    assert rows["apt"]["learning_rate"] == rows["lora"]["learning_rate"] == 1e-3
    head = HIDDEN * CLASSES + CLASSES
    # gated: shallow prompts, a gate per block but the last, a temperature per block
    assert rows["gated"]["trainable_parameters"] == head + TOKENS * HIDDEN + (LAYERS - 1) + LAYERS
    # APT, per block: prompts [p, d], key map [r, d] + [d, r] (r = 4), scale
    assert rows["apt"]["trainable_parameters"] == head + LAYERS * (TOKENS * HIDDEN + 2 * 4 * HIDDEN + 1)
    # LoRA r = 8 on the query and value projections of every block
    assert rows["lora"]["trainable_parameters"] == head + LAYERS * 2 * (2 * 8 * HIDDEN)
    for row in rows.values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["adapter_path"] == str(out / row["method"])

    saved = {m: json.loads((out / m / "adapter_config.json").read_text()) for m in rows}
    assert saved["gated"]["peft_type"] == "GATED_PROMPT" and saved["gated"]["gate_init"] == 10.0
    assert saved["apt"]["peft_type"] == "APPROX_PROMPT" and saved["apt"]["rank"] == 4
    assert saved["lora"]["peft_type"] == "LORA" and (saved["lora"]["r"], saved["lora"]["lora_alpha"]) == (8, 16)
    assert sorted(saved["lora"]["target_modules"]) == ["q_proj", "v_proj"]  # found by structure, path-free
    for method in rows:
        assert saved[method]["modules_to_save"] == ["classifier"]
        snippet = _card_snippet(out / method)
        assert snippet.startswith("import hf_vpt") and "AutoModelForImageClassification" in snippet
        base = recipe.load_transfer_model(data["backbone"]["path"])
        _reload_and_compare(summary["adapters"][method]["model"], str(out / method), base)


def test_lora_targets_are_found_by_structure(recipe):
    from transformers import ViltConfig, ViltModel, ViTConfig, ViTForImageClassification

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, **small))
    assert recipe.attention_projections(vit) == ["q_proj", "v_proj"]  # transformers 5.x names
    assert recipe.attention_projections(ViltModel(ViltConfig(**small))) == ["query", "value"]  # the older names
    # A module outside the blocks with the same name: the bare names would hit it, so full paths come back.
    vit.q_proj = torch.nn.Linear(32, 32)
    targets = recipe.attention_projections(vit)
    assert len(targets) == 4 and all(t.startswith("vit.") for t in targets) and "q_proj" not in targets
    with pytest.raises(ValueError, match="contains no transformer that hf_vpt knows"):
        recipe.attention_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_bad_options_name_the_fix(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--methods", "vpt_deep,prefix"])
    assert "unknown methods ['prefix']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args(["--push_to_hub"])
    assert "use it with --model_name_or_path" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["vpt_deep", "lora"])
def test_local_model_and_imagefolder(recipe, tmp_path, method, capsys):
    """The user-data path, offline: a local checkpoint and a local imagefolder stand in for the Hub."""
    from transformers import ViTForImageClassification

    checkpoint, _ = _tiny_checkpoint_and_imagefolder(tmp_path, {"train": 6, "val": 3})

    out = tmp_path / "out"
    summary = recipe.main(
        [
            "--model_name_or_path", str(checkpoint),
            "--train_dir", str(tmp_path / "train"),
            "--validation_dir", str(tmp_path / "val"),
            "--method", method,
            "--num_prompt_tokens", "2",
            "--epochs", "2",
            "--batch_size", "4",
            "--output_dir", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    (row,) = data["results"]
    assert row["method"] == method and 0.0 <= row["accuracy_mean"] <= 1.0
    assert data["labels"] == ["dark", "light"] and data["eval_split"] == "validation"
    printed = capsys.readouterr().out
    epochs = [float(x) for x in re.findall(r"epoch \d+: eval accuracy ([\d.]+) %", printed)]
    assert len(epochs) == 2  # evaluated after each of the 2 epochs
    assert epochs[-1] == pytest.approx(100 * row["accuracy_mean"], abs=0.01)  # the last one is the final model
    adapter = 2 * 2 * 32 if method == "vpt_deep" else 2 * 2 * (2 * 8 * 32)  # 2 prompts / LoRA q, v; 2 blocks
    assert row["trainable_parameters"] == 32 * 2 + 2 + adapter
    snippet = _card_snippet(out / method)
    ast.parse(snippet)
    assert snippet.startswith("import hf_vpt") and f'from_pretrained("{checkpoint}")' in snippet
    assert 'id2label={0: "dark", 1: "light"}' in snippet
    base = ViTForImageClassification.from_pretrained(checkpoint, num_labels=2, ignore_mismatched_sizes=True)
    _reload_and_compare(summary["adapters"][method]["model"], str(out / method), base)


def test_mae_encoder_becomes_the_same_vit():
    """The MAE encoder copied into ViTForImageClassification computes what ViTMAEModel computes unmasked."""
    import digits_mae
    from transformers import ViTMAEModel

    settings = {
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "decoder_hidden_size": HIDDEN,
        "decoder_num_hidden_layers": 1,
        "mask_ratio": 0.75,
        "norm_pix_loss": True,
    }
    torch.manual_seed(0)
    mae = digits_mae._mae_model(settings, num_channels=1).eval()
    vit = digits_mae._encoder_as_vit(mae, settings, 1, (0, 1, 2, 3, 4)).eval()
    unmasked = ViTMAEModel(mae.vit.config.__class__(**{**mae.vit.config.to_dict(), "mask_ratio": 0.0})).eval()
    unmasked.load_state_dict(mae.vit.state_dict())
    pixels = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.arange(16, dtype=torch.float32).expand(3, 16)  # increasing noise keeps the patch order
    with torch.no_grad():
        expected = unmasked(pixel_values=pixels, noise=noise).last_hidden_state
        got = vit.vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mean_token_readout_matches_its_definition(recipe, tmp_path):
    """Linear probing on the MAE backbone reads `norm(mean of the non-CLS tokens)`, not the CLS token."""
    import digits_mae
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, intermediate_size=64, num_labels=CLASSES,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        expected = model.classifier(model.vit.layernorm(hidden[:, 1:].mean(dim=1)))
        cls_logits = model(pixel_values=pixels).logits
        handle = digits_mae.mean_token_readout(model)
        got = model(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, cls_logits)
    handle.remove()


def test_mae_backbone_experiment(recipe, tmp_path):
    """The MAE table: pretraining runs and is cached, every method trains with MAE's readout, gates are plotted."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        *[a for a in TINY if a not in ("--backbones", "supervised")],
        "--backbones", "mae",
        "--mae_methods", "linear,vpt_deep,gated",
        "--mae_pretrain_epochs", "3",
        "--num_seeds", "2",
        "--num_prompt_tokens", str(TOKENS),
        "--output_dir", str(out),
        "--cache_dir", str(cache),
    ]  # fmt: skip
    summary = recipe.main(argv)
    data = json.loads((out / "results.json").read_text())
    assert list(data["by_backbone"]) == ["mae"] and data["readout"] == "mean"
    backbone = data["backbone"]
    assert backbone["kind"] == "mae" and not backbone["reused"]
    # Three epochs of the MAE objective already lower the held-out reconstruction loss of the untrained model.
    assert backbone["heldout_reconstruction_loss"] < backbone["heldout_reconstruction_loss_at_init"]
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["linear", "vpt_deep", "gated"]
    for method in ("vpt_deep", "gated"):
        saved = json.loads((out / "mae" / method / "adapter_config.json").read_text())
        assert saved["readout"] == "mean_model_norm"
        _reload_and_compare(
            summary["adapters"][method]["model"],
            str(out / "mae" / method),
            recipe.load_transfer_model(backbone["path"]),
        )
    gates = data["gates"]
    assert len(gates) == 2 and [row["block"] for row in gates[0]] == list(range(LAYERS))
    assert gates[0][-1]["gate"] is None and 0.0 < gates[0][0]["gate"] < 1.0
    assert (out / "mae" / "gates.png").stat().st_size > 1000
    again = recipe.main([*argv, "--mae_methods", "linear", "--output_dir", str(tmp_path / "again")])
    assert again["backbone"]["reused"] and again["backbone"]["path"] == backbone["path"]


def test_mae_learning_rates_are_parsed_and_checked(recipe):
    args = recipe.parse_args(["--mae_lrs", "gated=0.05, vpt_deep=0.1"])
    assert args.mae_lrs == {"gated": 0.05, "vpt_deep": 0.1}
    assert recipe.learning_rate(args, "gated", "mae") == 0.05
    assert recipe.learning_rate(args, "gated", "supervised") == args.lr_gated
    assert recipe.learning_rate(args, "linear", "mae") == args.lr_linear
    for bad, named in (("gated", "method=value"), ("nope=1", "method=value"), ("gated=x", "not a number")):
        with pytest.raises(SystemExit):
            recipe.parse_args(["--mae_lrs", bad])
        with pytest.raises(ValueError, match=named):
            recipe.parse_method_values(bad, "mae_lrs")


def _tiny_checkpoint_and_imagefolder(root: Path, splits: dict[str, int] | None = None) -> tuple[Path, Path]:
    """A tiny local ViT checkpoint (with its image processor) and a two-class imagefolder per split (`splits`: name
    -> images per class; default 6 training images per class). Returns the checkpoint and the training folder."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    checkpoint = root / "tiny-vit"
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=7)
    )  # fmt: skip
    vit.save_pretrained(checkpoint)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    for split, count in (splits or {"train": 6}).items():
        for name, level in (("dark", 40), ("light", 200)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 20, size=(20, 20, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return checkpoint, root / "train"


@pytest.mark.parametrize(
    ("every", "saved", "position", "last"),
    [
        ("2", ["checkpoint-2", "checkpoint-4"], (4, 1, 1), "checkpoint-8"),
        ("epoch", ["checkpoint-3"], (3, 1, 0), "checkpoint-9"),
    ],
)
def test_hub_mode_resume_is_bit_exact(recipe, tmp_path, every, saved, position, last):
    """Stopped after 4 of 9 steps and resumed from the latest checkpoint (mid-epoch at step 4, or at the end of the
    first epoch), a VPT-deep run ends with the same prompts and head as an uninterrupted run, bit for bit, with
    prompt dropout and flips drawing random numbers on the way (so the restored RNG states and data order matter)."""
    from safetensors.torch import load_file

    checkpoint, train_dir = _tiny_checkpoint_and_imagefolder(tmp_path)
    # 12 images, 10 train / 2 eval (the split is seeded), batch 4: 3 batches = 3 steps per epoch, 3 epochs.
    base = [
        "--model_name_or_path", str(checkpoint),
        "--train_dir", str(train_dir),
        "--method", "vpt_deep",
        "--num_prompt_tokens", "2",
        "--prompt_dropout", "0.1",
        "--augment",
        "--epochs", "3",
        "--batch_size", "4",
        "--save_rank_tensors",
        "--no-progress",
    ]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    done = recipe.main([*base, "--output_dir", str(straight)])
    assert done["steps"] == 9 and done["finished"]
    assert not any(name.startswith("checkpoint-") for name in os.listdir(straight))

    resumable = [*base, "--output_dir", str(interrupted), "--checkpointing_steps", every]
    stopped = recipe.main([*resumable, "--stop_after_steps", "4"])
    assert stopped == {"experiment": "user data", "steps": 4, "finished": False}
    assert sorted(os.listdir(interrupted)) == [*saved, "rank0"]
    state = json.loads((interrupted / saved[-1] / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == position and state["total_steps"] == 9

    resumed = recipe.main([*resumable, "--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 9 and resumed["finished"]
    assert (interrupted / last).is_dir() and (interrupted / "vpt_deep" / "adapter_config.json").is_file()

    initial = load_file(straight / "rank0" / "vpt_deep-init.safetensors")
    expected = load_file(straight / "rank0" / "vpt_deep.safetensors")
    actual = load_file(interrupted / "rank0" / "vpt_deep.safetensors")
    assert sorted(expected) == sorted(actual) == sorted(initial)
    prompts = [key for key in expected if "prompt" in key.lower() or "_bank" in key]
    heads = [key for key in expected if "classifier" in key]
    assert prompts and heads and len(prompts) + len(heads) == len(expected)
    for key, value in expected.items():
        assert value.dtype == torch.float32 and torch.equal(value, actual[key]), key
        assert not torch.equal(value, initial[key]), key  # training moved every trained tensor
    assert resumed["results"][0]["accuracy_mean"] == done["results"][0]["accuracy_mean"]


def test_resume_options_name_the_fix(recipe, tmp_path, capsys):
    hub = ["--model_name_or_path", str(tmp_path / "model"), "--train_dir", str(tmp_path / "images")]
    out = ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        recipe.parse_args(["--resume_from_checkpoint", "latest"])
    assert "--resume_from_checkpoint applies to --model_name_or_path runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args(["--checkpointing_steps", "5"])
    assert "--checkpointing_steps applies to --model_name_or_path runs" in capsys.readouterr().err

    missing = tmp_path / "out" / "checkpoint-7"
    with pytest.raises(SystemExit):
        recipe.parse_args([*hub, *out, "--resume_from_checkpoint", str(missing)])
    assert f"--resume_from_checkpoint {missing}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([*hub, *out, "--resume_from_checkpoint", "latest"])
    assert f"there is no checkpoint in {tmp_path / 'out'}" in capsys.readouterr().err
    missing.mkdir(parents=True)  # a folder, but no training_state.json in it
    with pytest.raises(SystemExit):
        recipe.parse_args([*hub, *out, "--resume_from_checkpoint", str(missing)])
    assert "not a checkpoint (it has no training_state.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([*hub, *out, "--resume_from_checkpoint", "latest"])
    assert "there is no checkpoint in" in capsys.readouterr().err

    (missing / "training_state.json").write_text("{}")
    assert recipe.parse_args([*hub, *out, "--resume_from_checkpoint", "latest"]).resume_from_checkpoint == str(missing)
    for bad in ("0", "often", "2.5"):
        with pytest.raises(SystemExit):
            recipe.parse_args([*hub, "--checkpointing_steps", bad])
        assert "--checkpointing_steps takes a positive number of steps or 'epoch'" in capsys.readouterr().err
    assert recipe.parse_args([*hub, "--checkpointing_steps", "epoch"]).checkpointing_steps == "epoch"
    assert recipe.parse_args([*hub, "--checkpointing_steps", "3"]).checkpointing_steps == 3
