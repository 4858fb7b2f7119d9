"""Class prefixes for autoregressive sampling with generative prompts: the prompts' keys and values, once per class.

In a prompted ImageGPT the `p` prompts come first and attention is causal, so in every layer the keys and values of
the prompt positions depend only on the prompts, that is on the adapter and the class label, never on the image
tokens. `PromptPrefixCache` computes them with one forward of the prompts alone (an empty image sequence) for all the
classes it has not seen yet, keeps one key and one value tensor `[heads, p, head_size]` per layer and class, and
builds for a batch of labels the `DynamicCache` that a forward of `[prompts; SOS, ...]` holds after its prompt
positions. Sampling starts from that cache, marked as holding `p` prompts, so the adapter inserts nothing and keeps
the image positions `0 .. L-1`; no forward after the prefix one has a prompt row, and the prefix of a class serves
every sample of that class, every decoding step, and every call that is given the same `PromptPrefixCache`.

The prefix is reused only where the prompts are deterministic, in eval mode: in training mode (dropout) every sample
needs its own prompts, and `prompt_prefix_applies` is False. Cached prefixes are dropped when the adapter's generator
or the frozen transformer changes (an optimiser step, a loaded state dict, weights edited in place, another active
adapter, a new dtype or device), so a cache kept across training steps or weight swaps never serves stale prompts.
Edits through `tensor.data` bypass torch's version counter: call `clear()` after those.
"""

from __future__ import annotations

import torch

from .._compat import cache_from_layers, cache_layers, cache_length, output_cache, parameter_version
from ..tuners.generative_prompt.layouts import IMAGEGPT
from ..tuners.generative_prompt.model import CACHE_PROMPT_ATTRIBUTE, GenerativePromptModel


def _generative_tuner(model) -> GenerativePromptModel | None:
    """The `GenerativePromptModel` of a `PeftModel` (or the tuner itself); None for any other model."""
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, GenerativePromptModel):
            return candidate
    return None


def _prompted_imagegpt(model):
    """`(tuner, tower, adapter)` when `model` prompts an ImageGPT with one active adapter in eval mode, else None."""
    tuner = _generative_tuner(model)
    if tuner is None or tuner._batch_adapter_names is not None:
        return None
    tower = next((t for t in tuner._towers if t.spec is IMAGEGPT), None)
    if tower is None or not tuner._prompting(tower):
        return None
    active = tower.blocks[0].active_adapters
    if len(active) != 1:
        return None
    generator = tuner.banks[active[0]].generators[tower.kind]
    if tower.root.training or generator.training:
        return None
    return tuner, tower, active[0]


def prompt_prefix_applies(model) -> bool:
    """Whether `model` is a generative-prompted ImageGPT whose prompt keys/values can be cached per class now.

    True with one active `GenerativePromptConfig` adapter on an ImageGPT in eval mode; False for a model without
    one, with the adapter disabled, or in training mode (where dropout makes every sample's prompts different).
    """
    return _prompted_imagegpt(model) is not None


class PromptPrefixCache:
    """Per-class key/value caches of the prompt positions of a generative-prompted ImageGPT, computed on demand.

    Example:

        ```py
        >>> prefixes = PromptPrefixCache(model)  # model: a PeftModel with a GenerativePromptConfig adapter, in eval
        >>> for labels in batches_of_labels:  # each class's prompts go through the model once, whatever the batches
        ...     tokens = autoregressive_sample(model, class_labels=labels, cache_prompt_prefix=prefixes)
        ```

    Attributes:
        num_prefix_forwards: forwards of prompts alone run so far (one per `for_batch` call that met new classes).
        num_prefix_rows: prompt sets put through the model so far (one per class, per generator version).
    """

    def __init__(self, model):
        if _generative_tuner(model) is None:
            raise ValueError(
                f"PromptPrefixCache needs a model with a GenerativePromptConfig adapter; got {type(model).__name__}."
            )
        self.model = model
        self.num_prefix_forwards = 0
        self.num_prefix_rows = 0
        self._entries: dict[int | None, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self._signature = None

    def __len__(self) -> int:
        return len(self._entries)

    def belongs_to(self, model) -> bool:
        return _generative_tuner(model) is _generative_tuner(self.model)

    def clear(self) -> None:
        self._entries.clear()
        self._signature = None

    def for_batch(self, class_labels: torch.Tensor | None = None, batch_size: int | None = None):
        """The `DynamicCache` of the prompt positions of every sample: one class's prefix per label, gathered.

        Args:
            class_labels: `[B]` labels of a class-conditional adapter (ignored, except for the batch size, by an
                unconditional one).
            batch_size: number of samples; needed only without `class_labels`.

        The cache holds `p` positions per layer, is marked as holding prompts, and is a new object each call (the
        sampling loop grows it in place); the per-class tensors it was gathered from stay untouched.
        """
        state = _prompted_imagegpt(self.model)
        if state is None:
            raise ValueError(
                "No class prefix can be cached: the model needs one active GenerativePromptConfig adapter on an "
                "ImageGPT, in eval mode (`model.eval()`); with dropout every sample needs its own prompts."
            )
        tuner, tower, adapter = state
        generator = tuner.banks[adapter].generators[tower.kind]
        device = tower.root.get_input_embeddings().weight.device
        if class_labels is not None and not isinstance(class_labels, torch.Tensor):
            class_labels = torch.as_tensor(class_labels)
        if batch_size is None:
            if class_labels is None:
                raise ValueError("Pass `class_labels` (one label per sample) or `batch_size`.")
            batch_size = len(class_labels)
        if class_labels is not None and len(class_labels) != batch_size:
            raise ValueError(f"`class_labels` has {len(class_labels)} entries for a batch of {batch_size}.")
        if generator.is_conditional:
            if class_labels is None:
                raise ValueError(
                    f"Adapter '{adapter}' generates class-conditional prompts (num_classes={generator.num_classes}); "
                    "pass one class label per sample."
                )
            labels = generator.check_labels(class_labels).to(device)
            classes, rows = torch.unique(labels, return_inverse=True)
            keys: list[int | None] = [int(c) for c in classes.tolist()]
        else:
            keys = [None]
            rows = torch.zeros(batch_size, dtype=torch.long, device=device)

        signature = self._signature_of(tower, generator, adapter)
        if signature != self._signature:
            self._entries.clear()
            self._signature = signature
        missing = [key for key in keys if key not in self._entries]
        if missing:
            self._compute(tower, generator, missing)

        layers = [
            (
                torch.stack([self._entries[key][0][layer] for key in keys])[rows],
                torch.stack([self._entries[key][1][layer] for key in keys])[rows],
            )
            for layer in range(len(self._entries[keys[0]][0]))
        ]
        cache = cache_from_layers(tower.config, layers)
        setattr(cache, CACHE_PROMPT_ATTRIBUTE, generator.num_tokens)
        return cache

    @torch.no_grad()
    def _compute(self, tower, generator, keys: list[int | None]) -> None:
        """One forward of the prompts of `keys` alone (no image token); keeps their per-layer keys and values."""
        embeddings = tower.root.get_input_embeddings().weight
        empty = torch.zeros(len(keys), 0, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        extra = {}
        if generator.is_conditional:
            extra["class_labels"] = torch.tensor(keys, dtype=torch.long, device=embeddings.device)
        output = self.model(inputs_embeds=empty, use_cache=True, **extra)
        cache = output_cache(output)
        count = getattr(cache, CACHE_PROMPT_ATTRIBUTE, 0)
        if count != generator.num_tokens or cache_length(cache) != count:
            raise RuntimeError(
                f"The prompt forward left {cache_length(cache)} cached positions ({count} marked as prompts); "
                f"expected the {generator.num_tokens} prompts."
            )
        layers = cache_layers(cache)
        for index, key in enumerate(keys):
            self._entries[key] = (tuple(k[index] for k, _ in layers), tuple(v[index] for _, v in layers))
        self.num_prefix_forwards += 1
        self.num_prefix_rows += len(keys)

    @staticmethod
    def _signature_of(tower, generator, adapter: str) -> tuple:
        """What the cached keys/values depend on besides the label: the adapter, its generator and every weight and
        buffer of the frozen transformer. In-place updates (optimiser steps, `load_state_dict`, edits under
        `torch.no_grad()`) bump a tensor's version counter; replaced tensors change its storage."""

        def state(tensors) -> tuple:
            return tuple((t.data_ptr(), parameter_version(t), t.shape, t.dtype, t.device) for t in tensors)

        return adapter, state(generator.parameters()), state(tower.root.parameters()), state(tower.root.buffers())


def prompt_prefix_cache(model, class_labels: torch.Tensor | None = None, batch_size: int | None = None):
    """The per-sample `DynamicCache` of the prompt positions, with one prompt forward for the distinct classes.

    `model(input_ids=[SOS, ...], cache=prompt_prefix_cache(model, labels), use_cache=True)` gives the
    logits of `model(input_ids=[SOS, ...], class_labels=labels)`. To reuse prefixes across batches keep a
    `PromptPrefixCache` and call its `for_batch`.
    """
    return PromptPrefixCache(model).for_batch(class_labels=class_labels, batch_size=batch_size)
