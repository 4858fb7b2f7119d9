"""The generative digits study (ImageGPT 0-4 -> 5-9, examples/generative_digits/run.py) end to end with `--quick`
settings, plus its Fréchet distance (the one of `hf_vpt.metrics.inception`)."""

from __future__ import annotations

import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from shared_helpers import (  # noqa: E402
    assert_bad_options_exit,
    assert_cached_by_pretrain_cache,
    check_generative_study_outputs,
    load_example,
    reduced_generative_argv,
)

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT before loading)
from hf_vpt.sampling import autoregressive_sample  # noqa: E402


EMBED, PROMPTS, PER_CLASS, COLUMNS, LEVELS = 32, 8, 12, 6, 4
QUICK = reduced_generative_argv("n_embd", EMBED, PROMPTS, PER_CLASS, COLUMNS, LEVELS)


@pytest.fixture(scope="module")
def recipe():
    return load_example("examples/generative_digits/run.py", "generative_digits_study")


def test_frechet_distance_matches_the_textbook_formula(recipe):
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert recipe.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert recipe.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(6, dtype=np.float64)
    assert recipe.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # a singular covariance (a constant feature) still gives a finite, correct value
    flat = np.concatenate([a[:, :5], np.ones((400, 1))], axis=1)
    assert recipe.frechet_distance(flat, flat + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_bad_options_name_the_fix(recipe, capsys):
    cases = (
        (["--num_levels", "1"], "--num_levels"),
        (["--seeds", "0,x"], "--seeds"),
        (["--methods", "full_finetune", "--guidance_scales", "2"], "generative_prompt"),
        (["--methods", "lora"], "unknown methods"),
        (["--n_embd", "30", "--n_head", "4"], "--n_head"),
    )
    assert_bad_options_exit(recipe.parse_args, cases, capsys)


def test_quick_digits_transfer(recipe, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    summary = recipe.main([*QUICK, "--output_dir", str(out), "--cache_dir", str(cache)])

    data = check_generative_study_outputs(out, COLUMNS)  # the files and rows both studies write
    rows = {row["method"]: row for row in data["results"]}
    adapter = Path(data["adapter_path"])
    assert data["seeds"] == [0]
    assert_cached_by_pretrain_cache(data["generator"], cache, "digits_imagegpt")
    assert data["classifier"]["heldout_accuracy"] > 0.85  # a working instrument, even in the quick run
    assert rows["generative_prompt"]["train_time_s_mean"] > 0 and rows["full_finetune"]["train_time_s_mean"] > 0

    # trainable parameters: the factorised generator (C + p) * d + LayerNorm, and everything for full fine-tuning
    base = recipe.load_generator(data["generator"]["path"])
    generator_params = (5 + PROMPTS) * EMBED + 2 * EMBED
    assert rows["no_adaptation"]["trainable_parameters"] == 0
    assert rows["generative_prompt"]["trainable_parameters"] == generator_params
    assert rows["full_finetune"]["trainable_parameters"] == generator_params + sum(
        p.numel() for p in base.parameters()
    )

    # behaviour: adapting to 5-9 lowers the likelihood loss of the 5-9 digits below the frozen 0-4 generator's
    frozen = rows["no_adaptation"]
    for name in ("generative_prompt", "full_finetune"):
        assert rows[name]["train_nll_mean"] < frozen["train_nll_mean"] - 0.01
        assert rows[name]["heldout_nll_mean"] < frozen["heldout_nll_mean"] - 0.01
    assert rows["full_finetune"]["heldout_nll_mean"] < rows["generative_prompt"]["heldout_nll_mean"]
    # the real 5-9 digits are far closer to the held-out ones than the unadapted generator's 0-4 style samples
    assert rows["real"]["frechet_distance_mean"] < 0.5 * frozen["frechet_distance_mean"]

    # the saved adapter loads back and reproduces the saved samples' logits, and the samples themselves
    saved = torch.load(out / "generative_prompt_samples.pt", weights_only=True)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    sos = torch.full((len(saved["tokens"]), 1), LEVELS)
    with torch.no_grad():
        inputs = torch.cat([sos, saved["tokens"][:, :-1]], dim=1)
        logits = reloaded(input_ids=inputs, class_labels=saved["class_labels"], use_cache=False).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-6)
    again = autoregressive_sample(
        reloaded,
        class_labels=saved["class_labels"],
        num_tokens=64,
        generator=torch.Generator().manual_seed(int(saved["seed"])),
    )
    assert torch.equal(again, saved["tokens"])
    assert summary["adapter_path"] == str(adapter)

    # the prompts carry the class: the held-out 5-9 digits are likelier under their own class's prompts
    tokens, labels = recipe.load_digit_tokens(LEVELS)
    _, held = recipe.stratified_split(labels, recipe.TRANSFER_CLASSES, 0.5, 0)
    sequences, own = recipe.with_sos(tokens[held], LEVELS), labels[held] - 5
    matched = recipe.mean_nll(reloaded, sequences, own)
    assert matched == pytest.approx(rows["generative_prompt"]["heldout_nll_mean"], abs=1e-5)
    assert matched < recipe.mean_nll(reloaded, sequences, (own + 1) % 5) - 0.005

    # a second run with the same generator settings reuses the cached pretraining
    second = recipe.main(
        [*QUICK, "--methods", "no_adaptation", "--guidance_scales", "", "--output_dir", str(tmp_path / "again")]
        + ["--cache_dir", str(cache)]
    )
    assert second["generator"]["reused"] and second["generator"]["path"] == data["generator"]["path"]
    assert second["generator"]["heldout_nll"] == pytest.approx(data["generator"]["heldout_nll"])
    assert second["adapter_path"] is None
    (no_adaptation,) = [row for row in second["results"] if row["method"] == "no_adaptation"]
    assert no_adaptation["per_seed"][0]["class_fidelity"] == rows["no_adaptation"]["per_seed"][0]["class_fidelity"]
