"""Cached class prefixes for autoregressive sampling of a generative-prompted ImageGPT (tiny random models)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

import hf_vpt
from hf_vpt.sampling import PromptPrefixCache, autoregressive_sample, prompt_prefix_applies, prompt_prefix_cache
from hf_vpt.testing_utils import tiny_imagegpt


N_POSITIONS = 16
SOS = 16  # vocab_size - 1
PROMPTS = 3
CLASSES = 4
LABELS = torch.tensor([2, 0, 2, 1, 0])  # a batch mixing classes; 3 distinct


def _imagegpt(seed: int = 0) -> transformers.ImageGPTForCausalImageModeling:
    torch.manual_seed(seed)
    return tiny_imagegpt(codebook_size=SOS, n_positions=N_POSITIONS).eval()


def _prompted(num_classes: int | None = CLASSES, seed: int = 0):
    config = hf_vpt.GenerativePromptConfig(num_prompt_tokens=PROMPTS, num_classes=num_classes)
    model = get_peft_model(_imagegpt(), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.generative_prompt_bank["default"].parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _prompt_generator(model):
    return model.base_model.generative_prompt_bank["default"].generators["generative"]


def _sample(model, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("top_k", 6)
    return autoregressive_sample(model, generator=torch.Generator().manual_seed(seed), **kwargs)


class _StepLogits:
    """Records the logits of the last position of every forward with image tokens (one row per decoding step)."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self._handle = model.get_base_model().lm_head.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if output.shape[1]:  # the prefix forward has no image token
            self.steps.append(output[:, -1].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    @property
    def stacked(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1)  # [B, steps, V]


def _reference_logits(model, labels, tokens: torch.Tensor) -> torch.Tensor:
    """Full forward of `[SOS, x_1 .. x_(n-1)]` with prompts, no cache: `[B, n, V]`, row t predicts x_(t+1)."""
    ids = torch.cat([torch.full((tokens.shape[0], 1), SOS), tokens[:, :-1]], dim=1)
    extra = {} if labels is None else {"class_labels": labels}
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **extra).logits


# ---------------------------------------------------------------------------------------------------------------
# the prefix itself
# ---------------------------------------------------------------------------------------------------------------
def test_prefix_equals_the_prompt_positions_of_a_prompted_forward():
    model = _prompted()
    ids = torch.cat([torch.full((len(LABELS), 1), SOS), torch.randint(0, SOS, (len(LABELS), 6))], dim=1)
    with torch.no_grad():
        full = model(input_ids=ids, class_labels=LABELS, use_cache=True)
        prefix = prompt_prefix_cache(model, LABELS)
        assert prefix.get_seq_length() == PROMPTS and len(prefix.layers) == len(full.past_key_values.layers)
        for ours, theirs in zip(prefix.layers, full.past_key_values.layers):
            torch.testing.assert_close(ours.keys, theirs.keys[:, :, :PROMPTS], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ours.values, theirs.values[:, :, :PROMPTS], atol=1e-6, rtol=1e-6)
        # image positions do not shift: the same logits as the forward that carries the prompts
        cached = model(input_ids=ids, past_key_values=prefix, use_cache=True)
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert cached.past_key_values.get_seq_length() == PROMPTS + ids.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# sampling: same samples, same per-step logits, one prefix forward per class
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"top_k": 6}, {"top_k": None, "temperature": 1.3}, {"temperature": 0}])
def test_cached_prefix_sampling_is_bit_identical_to_uncached(options):
    model = _prompted()
    cached = _sample(model, class_labels=LABELS, **options)
    assert cached.shape == (len(LABELS), N_POSITIONS) and cached.dtype == torch.long
    assert torch.equal(cached, _sample(model, class_labels=LABELS, cache_prompt_prefix=False, **options))
    assert torch.equal(cached, _sample(model, class_labels=LABELS, use_cache=False, **options))
    # image completion: known first tokens after the prefix
    known = cached[:, :5]
    completed = _sample(model, seed=4, class_labels=LABELS, prefix=known, **options)
    assert torch.equal(completed[:, :5], known)
    assert torch.equal(
        completed, _sample(model, seed=4, class_labels=LABELS, prefix=known, cache_prompt_prefix=False, **options)
    )


def test_per_step_logits_match_the_uncached_paths():
    model = _prompted()
    runs = {}
    for name, kwargs in {
        "class prefix": {},
        "prompts in the first forward": {"cache_prompt_prefix": False},
        "full recomputation": {"use_cache": False},
    }.items():
        with _StepLogits(model) as recorder:
            tokens = _sample(model, class_labels=LABELS, **kwargs)
        runs[name] = (tokens, recorder.stacked)
    tokens, logits = runs["class prefix"]
    assert logits.shape == (len(LABELS), N_POSITIONS, SOS)
    for name, (other_tokens, other_logits) in runs.items():
        assert torch.equal(other_tokens, tokens), name
        torch.testing.assert_close(other_logits, logits, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(_reference_logits(model, LABELS, tokens), logits, atol=1e-5, rtol=0)


def test_prefix_forward_runs_once_per_class_and_no_later_forward_has_prompt_rows():
    model = _prompted()
    generated: list[torch.Tensor] = []
    rows: list[tuple[int, int]] = []
    prompt_hook = _prompt_generator(model).register_forward_hook(lambda m, args, out: generated.append(out.shape))
    labels_seen: list[torch.Tensor] = []
    label_hook = _prompt_generator(model).register_forward_pre_hook(lambda m, args: labels_seen.append(args[0]))
    block = model.get_base_model().transformer.h[0].base_layer
    block_hook = block.register_forward_pre_hook(lambda m, args: rows.append(tuple(args[0].shape[:2])))
    try:
        prefixes = PromptPrefixCache(model)
        first = _sample(model, class_labels=LABELS, cache_prompt_prefix=prefixes)
        assert prefixes.num_prefix_forwards == 1 and prefixes.num_prefix_rows == 3 and len(prefixes) == 3
        assert len(generated) == 1 and torch.equal(labels_seen[0], torch.tensor([0, 1, 2]))
        # the prefix forward has the 3 classes' prompts and no image token; every decoding forward has 1 image
        # token per sample and no prompt row
        assert rows == [(3, PROMPTS)] + [(len(LABELS), 1)] * N_POSITIONS

        # later calls reuse the prefixes: only class 3 is new here, nothing is new in the third call
        second_labels = torch.tensor([3, 1, 3])
        second = _sample(model, seed=1, class_labels=second_labels, cache_prompt_prefix=prefixes)
        assert prefixes.num_prefix_forwards == 2 and prefixes.num_prefix_rows == 4
        assert torch.equal(labels_seen[-1], torch.tensor([3]))
        third = _sample(model, seed=2, class_labels=LABELS, cache_prompt_prefix=prefixes)
        assert prefixes.num_prefix_forwards == 2 and len(generated) == 2
        assert torch.equal(third, _sample(model, seed=2, class_labels=LABELS))  # the stored prefixes were not grown

        # the path without class prefixes puts every sample's prompts through the first forward
        rows.clear()
        uncached = _sample(model, class_labels=LABELS, cache_prompt_prefix=False)
        assert rows[0] == (len(LABELS), PROMPTS + 1) and rows[1:] == [(len(LABELS), 1)] * (N_POSITIONS - 1)
    finally:
        for handle in (prompt_hook, label_hook, block_hook):
            handle.remove()
    assert torch.equal(first, uncached)
    assert torch.equal(second, _sample(model, seed=1, class_labels=second_labels, cache_prompt_prefix=False))


def test_unconditional_generator():
    model = _prompted(num_classes=None)
    prefixes = PromptPrefixCache(model)
    with _StepLogits(model) as recorder:
        cached = _sample(model, batch_size=3, cache_prompt_prefix=prefixes)
    assert prefixes.num_prefix_forwards == 1 and prefixes.num_prefix_rows == 1
    with _StepLogits(model) as reference:
        uncached = _sample(model, batch_size=3, cache_prompt_prefix=False)
    assert torch.equal(cached, uncached) and cached.shape == (3, N_POSITIONS)
    torch.testing.assert_close(recorder.stacked, reference.stacked, atol=1e-5, rtol=0)
    torch.testing.assert_close(_reference_logits(model, None, cached), recorder.stacked, atol=1e-5, rtol=0)
    # labels are only a batch size to an unconditional generator; the one prefix serves every call
    assert torch.equal(
        _sample(model, seed=5, class_labels=torch.tensor([0, 3]), cache_prompt_prefix=prefixes),
        _sample(model, seed=5, batch_size=2, cache_prompt_prefix=False),
    )
    assert prefixes.num_prefix_forwards == 1
    with pytest.raises(ValueError, match="batch_size"):
        prefixes.for_batch()


def test_prefixes_follow_generator_updates():
    model = _prompted()
    prefixes = PromptPrefixCache(model)
    before = _sample(model, class_labels=LABELS, cache_prompt_prefix=prefixes)
    with torch.no_grad():
        _prompt_generator(model).class_embeddings.mul_(-1.0)  # an in-place update, as an optimiser step
    after = _sample(model, class_labels=LABELS, cache_prompt_prefix=prefixes)
    assert prefixes.num_prefix_forwards == 2
    assert torch.equal(after, _sample(model, class_labels=LABELS, cache_prompt_prefix=False))
    assert not torch.equal(before, after)


def test_where_class_prefixes_do_not_apply():
    model = _prompted()
    assert prompt_prefix_applies(model) and prompt_prefix_applies(model.base_model)
    assert not prompt_prefix_applies(_imagegpt())
    with pytest.raises(ValueError, match="GenerativePromptConfig"):
        PromptPrefixCache(_imagegpt())
    prefixes = PromptPrefixCache(model)
    with pytest.raises(ValueError, match="another model"):
        _sample(_prompted(), class_labels=LABELS, cache_prompt_prefix=prefixes)
    with pytest.raises(ValueError, match="class-conditional"):
        prefixes.for_batch(batch_size=2)
    with pytest.raises(ValueError, match="class_labels"):
        prefixes.for_batch(torch.tensor([0, CLASSES]))

    # adapter disabled: the frozen model's samples, no prefix
    with model.disable_adapter():
        assert not prompt_prefix_applies(model)
        plain = _sample(model, batch_size=2, cache_prompt_prefix=prefixes)
        with pytest.raises(ValueError, match="eval mode"):
            prefixes.for_batch(LABELS)
    assert torch.equal(plain, _sample(_imagegpt(), batch_size=2))
    assert prefixes.num_prefix_forwards == 0

    # training mode: dropout makes every sample's prompts its own, so the prompts go through the first forward
    model.train()
    try:
        assert not prompt_prefix_applies(model)
        _sample(model, class_labels=LABELS, num_tokens=3, cache_prompt_prefix=prefixes)
        assert prefixes.num_prefix_forwards == 0
    finally:
        model.eval()
