"""The digits transfer study (examples/digits_transfer), drastically shrunk: tiny pretraining, few shots and epochs."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT before loading)


STUDY_DIR = Path(__file__).resolve().parents[2] / "examples" / "digits_transfer"
sys.path.insert(0, str(STUDY_DIR))
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
    "--num_prompt_tokens", str(TOKENS),
]  # fmt: skip


@pytest.fixture(scope="module")
def run():
    return importlib.import_module("run")


def _reload_and_compare(trained, folder, base):
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert os.path.isfile(os.path.join(folder, name)), name
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    trained = trained.eval()
    size = base.config.image_size
    pixels = torch.randn(4, base.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(pixel_values=pixels).logits
        got = reloaded(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_study_methods_train_through_the_recipes_loop(run, tmp_path, monkeypatch):
    """Every method trains (and the backbone pretrains) in `recipes/_common.train_loop`, for epochs x batches steps;
    the adapters load back bit-exactly; a second run reuses the cached backbone."""
    import digits_backbones
    import digits_data
    from digits_training import _common

    calls = []
    real_loop = _common.train_loop

    def recording_loop(accelerator, args, model, *rest, **kwargs):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        result = real_loop(accelerator, args, model, *rest, **kwargs)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        calls.append((args.max_train_steps, result[1], any(not torch.equal(a, b) for a, b in zip(before, after))))
        return result

    monkeypatch.setattr(_common, "train_loop", recording_loop)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        *TINY,
        "--methods",
        "linear,vpt_shallow,vpt_deep,full",
        "--output_dir",
        str(out),
        "--cache_dir",
        str(cache),
    ]
    summary = run.main(argv)

    # pretraining: 2 epochs of ceil(~720 / 64) batches; transfer: 3 epochs of 20 shots in batches of 10
    pretrain_images = len(digits_data.pretrain_split(digits_data.load_digit_tensors(16)[1], 0)[0])
    pretrain_steps = 2 * math.ceil(pretrain_images / 64)
    assert calls == [(pretrain_steps, pretrain_steps, True)] + [(6, 6, True)] * 4

    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["linear", "vpt_shallow", "vpt_deep", "full"]
    for row in rows.values():
        assert len(row["accuracies"]) == 1 and 0.0 <= row["accuracy_mean"] <= 1.0
        assert row["title"] in data["table"]
    head = HIDDEN * CLASSES + CLASSES
    counts = {method: row["trainable_parameters"] for method, row in rows.items()}
    assert counts["linear"] == head
    assert counts["vpt_shallow"] == head + TOKENS * HIDDEN
    assert counts["vpt_deep"] == head + LAYERS * TOKENS * HIDDEN
    assert counts["linear"] < counts["vpt_shallow"] < counts["vpt_deep"] < counts["full"]
    assert rows["linear"]["optimizer"].startswith("SGD") and rows["full"]["optimizer"] == "AdamW"

    backbone = data["backbone"]
    assert not backbone["reused"] and 0.0 <= backbone["heldout_accuracy"] <= 1.0
    for method in ("vpt_shallow", "vpt_deep"):
        saved = json.loads((out / method / "adapter_config.json").read_text())
        assert saved["depth"] == method.split("_")[1] and saved["num_prompt_tokens"] == TOKENS
        assert saved["modules_to_save"] == ["classifier"]
        base = digits_backbones.load_transfer_model(backbone["path"])
        _reload_and_compare(summary["adapters"][method]["model"], str(out / method), base)
    # the demo's reload: the saved VPT-deep adapter predicts the digits the model in memory predicts
    assert data["reload"]["method"] == "vpt_deep" and len(data["reload"]["predicted"]) == 12

    calls.clear()
    again = run.main([*argv, "--methods", "linear", "--output_dir", str(tmp_path / "again")])
    assert again["backbone"]["reused"] and again["backbone"]["path"] == backbone["path"]
    assert again["backbone"]["heldout_accuracy"] == backbone["heldout_accuracy"]
    assert calls == [(6, 6, True)]  # no pretraining the second time


def test_opt_in_methods(run, tmp_path):
    """Gated, APT and LoRA come from the registry, with the study's optimisers, and load back bit-exactly."""
    import digits_backbones

    out = tmp_path / "out"
    argv = [*TINY, "--methods", "gated,apt,lora", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]
    summary = run.main(argv)
    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert rows["gated"]["optimizer"].startswith("SGD") and rows["gated"]["learning_rate"] == 1.0
    assert rows["apt"]["optimizer"] == rows["lora"]["optimizer"] == "AdamW"
    head = HIDDEN * CLASSES + CLASSES
    assert rows["gated"]["trainable_parameters"] == head + TOKENS * HIDDEN + (LAYERS - 1) + LAYERS
    assert rows["apt"]["trainable_parameters"] == head + LAYERS * (TOKENS * HIDDEN + 2 * 4 * HIDDEN + 1)
    assert rows["lora"]["trainable_parameters"] == head + LAYERS * 2 * (2 * 8 * HIDDEN)
    saved = {m: json.loads((out / m / "adapter_config.json").read_text()) for m in rows}
    assert saved["gated"]["peft_type"] == "GATED_PROMPT" and saved["gated"]["gate_init"] == 10.0
    assert saved["apt"]["rank"] == 4 and (saved["lora"]["r"], saved["lora"]["lora_alpha"]) == (8, 16)
    assert sorted(saved["lora"]["target_modules"]) == ["q_proj", "v_proj"]
    for method in rows:
        card = (out / method / "README.md").read_text()
        assert "scikit-learn digits 5-9" in card and "import hf_vpt" in card
        base = digits_backbones.load_transfer_model(data["backbone"]["path"])
        _reload_and_compare(summary["adapters"][method]["model"], str(out / method), base)


def test_mae_encoder_becomes_the_same_vit():
    """The MAE encoder copied into ViTForImageClassification computes what ViTMAEModel computes unmasked."""
    import digits_mae
    from transformers import ViTMAEModel

    settings = {
        "image_size": 16, "patch_size": 4, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "intermediate_size": 64, "decoder_hidden_size": HIDDEN,
        "decoder_num_hidden_layers": 1, "mask_ratio": 0.75, "norm_pix_loss": True,
    }  # fmt: skip
    torch.manual_seed(0)
    mae = digits_mae.mae_model(settings, num_channels=1).eval()
    vit = digits_mae.encoder_as_vit(mae, settings, 1).eval()
    unmasked = ViTMAEModel(mae.vit.config.__class__(**{**mae.vit.config.to_dict(), "mask_ratio": 0.0})).eval()
    unmasked.load_state_dict(mae.vit.state_dict())
    pixels = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.arange(16, dtype=torch.float32).expand(3, 16)  # increasing noise keeps the patch order
    with torch.no_grad():
        expected = unmasked(pixel_values=pixels, noise=noise).last_hidden_state
        got = vit.vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mean_token_readout_matches_its_definition():
    """Linear probing on the MAE backbone reads `norm(mean of the non-CLS tokens)`, not the CLS token."""
    import digits_mae

    from hf_vpt.testing_utils import tiny_vit

    torch.manual_seed(0)
    geometry = {"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": HIDDEN}
    model = tiny_vit(num_labels=CLASSES, num_hidden_layers=LAYERS, **geometry).eval()
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


def test_mae_backbone_experiment(run, tmp_path):
    """The MAE table: pretraining runs and is cached, every method trains with MAE's readout, gates are plotted."""
    import digits_backbones

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [
        *TINY, "--study", "--backbones", "mae", "--mae_methods", "linear,vpt_deep,gated", "--mae_pretrain_epochs", "3",
        "--num_seeds", "2", "--output_dir", str(out), "--cache_dir", str(cache),
    ]  # fmt: skip
    summary = run.main(argv)
    data = json.loads((out / "results.json").read_text())
    assert list(data["by_backbone"]) == ["mae"] and data["readout"] == "mean"
    backbone = data["backbone"]
    assert backbone["kind"] == "mae" and not backbone["reused"]
    # Three epochs of the MAE objective already lower the held-out reconstruction loss of the untrained model.
    assert backbone["heldout_reconstruction_loss"] < backbone["heldout_reconstruction_loss_at_init"]
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == ["linear", "vpt_deep", "gated"] and len(rows["linear"]["accuracies"]) == 2
    assert rows["gated"]["learning_rate"] == 0.05  # --mae_lrs
    for method in ("vpt_deep", "gated"):
        saved = json.loads((out / "mae" / method / "adapter_config.json").read_text())
        assert saved["readout"] == "mean_model_norm"
        base = digits_backbones.load_transfer_model(backbone["path"])
        _reload_and_compare(summary["adapters"][method]["model"], str(out / "mae" / method), base)
    gates = data["gates"]
    assert len(gates) == 2 and [row["block"] for row in gates[0]] == list(range(LAYERS))
    assert gates[0][-1]["gate"] is None and 0.0 < gates[0][0]["gate"] < 1.0
    assert (out / "mae" / "gates.png").stat().st_size > 1000
    again = run.main([*argv, "--mae_methods", "linear", "--num_seeds", "1", "--output_dir", str(tmp_path / "again")])
    assert again["backbone"]["reused"] and again["backbone"]["path"] == backbone["path"]


def test_tune_picks_the_best_cross_validated_rate(run, tmp_path):
    out = tmp_path / "out"
    argv = [*TINY, "--tune", "--tune_folds", "2", "--tune_lrs", "0.01,0.5", "--methods", "linear",
            "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    run.main(argv)
    data = json.loads((out / "tuning.json").read_text())
    scores = {row["lr"]: row["cv_accuracy"] for row in data["scores"]}
    assert set(scores) == {0.01, 0.5}
    best = max(scores, key=lambda lr: (scores[lr], -lr))
    assert data["best"]["linear"] == {"lr": best, "cv_accuracy": scores[best]}
    assert not (out / "results.json").exists()


def test_pretrain_cache_is_keyed_by_every_setting(tmp_path):
    from accelerate import Accelerator
    from pretrain_cache import cached_pretraining
    from transformers import ViTConfig, ViTModel

    made = []

    def pretrain():
        made.append(1)
        return ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)), {
            "score": 0.5
        }

    accelerator = Accelerator()
    first = cached_pretraining(accelerator, str(tmp_path), "toy", {"epochs": 1}, pretrain)
    second = cached_pretraining(accelerator, str(tmp_path), "toy", {"epochs": 1}, pretrain)
    other = cached_pretraining(accelerator, str(tmp_path), "toy", {"epochs": 2}, pretrain)
    assert len(made) == 2 and not first["reused"] and second["reused"] and not other["reused"]
    assert second == {**first, "reused": True} and first["score"] == 0.5 and first["settings"] == {"epochs": 1}
    assert other["path"] != first["path"] and ViTModel.from_pretrained(first["path"]) is not None
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder left behind


def test_bad_options_name_the_fix(run, capsys):
    for argv, expected in (
        (["--methods", "vpt_deepp"], "vpt_deepp"),
        (["--backbones", "imagenet"], "--backbones"),
        (["--mae_lrs", "gated=-1"], "must be positive"),
        (["--mae_lrs", "gated"], "method=value"),
        (["--shots", "0"], "--shots"),
    ):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
        assert expected in capsys.readouterr().err
