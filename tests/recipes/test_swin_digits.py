"""The Swin digits study (examples/swin_digits) in its `--quick` mode: every method trains on a Swin pretrained in
the run, the VPT rows count one prompt set per stage width, the saved adapter reloads bit-exactly and its prompts
were trained and change the predictions."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from peft import PeftModel  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT before loading)


SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "swin_digits" / "run.py"
TOKENS = 3


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("swin_digits_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("swin_digits")
    argv = ["--quick", "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache")]
    return run.main(argv), run.parse_args(argv)


def test_every_method_trains_and_vpt_counts_one_prompt_set_per_stage_width(run, study):
    summary, args = study
    rows = {row["method"]: row for row in summary["results"]}
    assert list(rows) == list(run.METHODS)
    assert args.num_prompt_tokens == TOKENS and summary["stage_widths"] == [32, 64]
    base = run.load_transfer_model(summary["backbone"]["path"])
    total = sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for p in base.classifier.parameters())
    assert head == 64 * 5 + 5  # the last stage's width -> 5 classes
    # shallow: one set at the first stage's width; deep: one set per block at its stage's width (2 blocks per stage)
    assert rows["vpt_shallow"]["prompt_parameters"] == TOKENS * 32
    assert rows["vpt_deep"]["prompt_parameters"] == TOKENS * (2 * 32 + 2 * 64)
    for method in ("vpt_shallow", "vpt_deep"):
        assert rows[method]["trainable_parameters"] == rows[method]["prompt_parameters"] + head
    assert rows["linear"]["trainable_parameters"] == head
    assert rows["full"]["trainable_parameters"] == total
    assert head < rows["lora"]["trainable_parameters"] < total
    for method, row in rows.items():
        assert 0.0 <= row["accuracy_mean"] <= 1.0
        saves_adapter = method in ("vpt_shallow", "vpt_deep", "lora")
        assert (row["adapter_path"] is not None and os.path.isdir(row["adapter_path"])) == saves_adapter
    assert "| VPT-deep | 901 |" in summary["table"]
    assert json.loads(Path(args.output_dir, "results.json").read_text())["table"] == summary["table"]


def test_saved_vpt_adapter_reloads_exactly_and_its_trained_prompts_matter(run, study):
    summary, args = study
    saved = summary["adapters"]["vpt_deep"]
    folder = Path(saved["path"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["stage_shapes"] == {"vision": [[2, 32], [2, 64]]}
    assert "stage_shapes" not in (folder / "README.md").read_text(encoding="utf-8")

    backbone = summary["backbone"]["path"]
    reloaded = PeftModel.from_pretrained(run.load_transfer_model(backbone), folder).eval()
    pixels = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = saved["model"].eval()(pixel_values=pixels).logits
        got = reloaded(pixel_values=pixels).logits
    torch.testing.assert_close(got, trained, rtol=0, atol=0)
    assert summary["reload"]["max_logit_difference"] == 0.0

    bank = reloaded.base_model.visual_prompt_bank["default"].embeddings

    # the prompts moved away from their initialisation (same seed, same build as the study's)
    def initial_prompts():
        set_seed(saved["seed"])
        initial = run.prepare_for_method(run.load_transfer_model(backbone), "vpt_deep", args)
        return initial.base_model.visual_prompt_bank["default"].embeddings

    initial_bank, again = initial_prompts(), initial_prompts()
    assert all(torch.equal(initial_bank[key], again[key]) for key in initial_bank)  # the seed fixes them
    assert set(bank) == set(initial_bank) == {"vision_stage0", "vision_stage1"}
    assert all(not torch.equal(bank[key], initial_bank[key]) for key in bank)
    # and they take part in the prediction: zeroing them changes the logits of the same head
    with torch.no_grad():
        for param in bank.values():
            param.zero_()
        without = reloaded(pixel_values=pixels).logits
    assert (without - trained).abs().max() > 1e-4


def test_methods_refused_on_swin_are_refused_with_the_reason(run, capsys):
    for method in ("gated", "apt"):
        with pytest.raises(SystemExit):
            run.parse_args(["--methods", method])
        assert "is not defined on Swin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--depths", "2,2", "--num_heads", "2"])
    assert "one entry per stage" in capsys.readouterr().err
