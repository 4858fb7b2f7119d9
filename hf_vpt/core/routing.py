"""Which adapter each sample of a batch uses, and how per-adapter tensors become per-sample ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BatchRoute:
    """The adapters of one forward: either one adapter for the whole batch or one adapter per sample."""

    adapters: list[str]  # unique names, in order of first appearance
    sample_groups: torch.Tensor | None  # [B] index into `adapters`; None when the whole batch uses adapters[0]
    batch_size: int

    @classmethod
    def single(cls, adapter: str, batch_size: int) -> BatchRoute:
        return cls([adapter], None, batch_size)

    @classmethod
    def per_sample(cls, names: list[str], batch_size: int, device: torch.device) -> BatchRoute:
        if len(names) != batch_size:
            raise ValueError(
                f"`adapter_names` has {len(names)} entries but the batch has {batch_size} samples; pass one adapter "
                "name per sample."
            )
        unique = list(dict.fromkeys(names))
        if len(unique) == 1:
            return cls.single(unique[0], batch_size)
        index = {name: i for i, name in enumerate(unique)}
        groups = torch.tensor([index[name] for name in names], device=device)
        return cls(unique, groups, batch_size)

    def gather(self, per_adapter: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """`[B, *shape]` from a function that gives one `[*shape]` tensor per adapter (shared, not copied, if one)."""
        if self.sample_groups is None:
            value = per_adapter(self.adapters[0])
            return value.unsqueeze(0).expand(self.batch_size, *value.shape)
        return torch.stack([per_adapter(name) for name in self.adapters])[self.sample_groups]

    def sample_mask(self, predicate: Callable[[str], bool], device: torch.device) -> torch.Tensor | None:
        """Boolean `[B]` mask of the samples whose adapter satisfies `predicate`; None if no sample does."""
        flags = [predicate(name) for name in self.adapters]
        if not any(flags):
            return None
        if self.sample_groups is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=device)
        return torch.tensor(flags, device=device)[self.sample_groups]

    def apply_per_adapter(self, tensor: torch.Tensor, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply `fn(adapter, tensor)` to each sample with that sample's adapter (e.g. its own dropout rate)."""
        if self.sample_groups is None:
            return fn(self.adapters[0], tensor)
        result = tensor
        for i, name in enumerate(self.adapters):
            rows = (self.sample_groups == i).view(-1, *([1] * (tensor.dim() - 1)))
            result = torch.where(rows, fn(name, tensor), result)
        return result
