"""The factorized prompt token generator of generative visual prompt tuning (Sohn et al., CVPR 2023).

For class `c` and prompt position `j` the generator produces

    prompt[c, j] = Dropout(head(LayerNorm(E[c] + Pos[j])))

with one embedding `E[c]` per class and one embedding `Pos[j]` per prompt position, so a class-conditional prompt set
costs `(C + p) · w` parameters instead of `C · p · d` for free per-class prompts. `head` is the identity (the
paper's released default), a linear map when the generator width `w` differs from the model width `d`, or a small
MLP. Without classes (`num_classes=None`) the generator has a single learned class row: one prompt set for all
samples (unconditional transfer).
"""

from __future__ import annotations

import torch
from torch import nn


def class_label_tensor(class_labels, device=None) -> torch.Tensor:
    """`class_labels` (a tensor, list or array of class indices) as a tensor; a clear error for anything else."""
    if isinstance(class_labels, torch.Tensor):
        return class_labels if device is None else class_labels.to(device)
    try:
        labels = torch.as_tensor(class_labels, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"`class_labels` must be integer class indices, one per sample (a list or a tensor); got "
            f"{class_labels!r:.200}. Map class names to indices first (e.g. with the dataset's `label2id`)."
        ) from exc
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(
            f"`class_labels` must be integer class indices, one per sample; got values of dtype {labels.dtype}."
        )
    return labels


class PromptGenerator(nn.Module):
    """Generates `[B, p, d]` prompts from class labels (or one `[p, d]` prompt set without classes).

    Args:
        num_tokens (`int`): Prompt length `p`.
        hidden_size (`int`): Width `d` of the model the prompts enter.
        num_classes (`int`, *optional*): Number of classes `C`; None for the unconditional generator.
        width (`int`, *optional*): Width `w` of the class and position embeddings (default `d`).
        mlp_hidden_size (`int`): If > 0, `head` is `Linear(w, m) -> GELU -> Linear(m, d)`.
        dropout (`float`): Dropout on the generated prompts (the paper uses 0.1).
        init_std (`float`): Standard deviation of the truncated-normal initialisation of `E` and `Pos`.
        layer_norm_eps (`float`): Epsilon of the LayerNorm (1e-6, Flax's default, as the released code).
    """

    def __init__(
        self,
        num_tokens: int,
        hidden_size: int,
        num_classes: int | None = None,
        width: int | None = None,
        mlp_hidden_size: int = 0,
        dropout: float = 0.1,
        init_std: float = 0.02,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        width = width or hidden_size
        self.num_tokens = num_tokens
        self.num_classes = num_classes
        self.class_embeddings = nn.Parameter(torch.empty(num_classes or 1, width))
        self.position_embeddings = nn.Parameter(torch.empty(num_tokens, width))
        nn.init.trunc_normal_(self.class_embeddings, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.trunc_normal_(self.position_embeddings, std=init_std, a=-2 * init_std, b=2 * init_std)
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        if mlp_hidden_size:
            self.head = nn.Sequential(
                nn.Linear(width, mlp_hidden_size), nn.GELU(), nn.Linear(mlp_hidden_size, hidden_size)
            )
        elif width != hidden_size:
            self.head = nn.Linear(width, hidden_size)
        else:
            self.head = nn.Identity()
        self.dropout = nn.Dropout(dropout)

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None

    def check_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Validate labels (a 1-D integer tensor with values in `[0, C)`) and return them as `long`."""
        class_labels = class_label_tensor(class_labels)
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.dim() != 1:
            raise ValueError(
                f"`class_labels` must be a 1-D integer tensor with one label per sample; got dtype "
                f"{class_labels.dtype} and shape {tuple(class_labels.shape)}."
            )
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= self.num_classes):
            raise ValueError(
                f"`class_labels` must lie in [0, {self.num_classes - 1}] (the generator has num_classes="
                f"{self.num_classes}); got values in [{int(class_labels.min())}, {int(class_labels.max())}]."
            )
        return class_labels.long()

    def prompt_table(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`[R, p, d]` prompts of the given class rows (all rows by default), before dropout."""
        embeddings = self.class_embeddings if rows is None else self.class_embeddings[rows]
        summed = embeddings[:, None, :] + self.position_embeddings[None, :, :]
        return self.head(self.norm(summed))

    def forward(self, class_labels: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """`[B, p, d]` prompts for `class_labels` (`[B]`); without classes `[p, d]`, or `[B, p, d]` if `batch_size`."""
        if self.is_conditional:
            if class_labels is None:
                raise ValueError(
                    f"This prompt generator is class-conditional (num_classes={self.num_classes}); pass one class "
                    "label per sample: `model(..., class_labels=labels)`."
                )
            labels = self.check_labels(class_labels).to(self.class_embeddings.device)
            return self.dropout(self.prompt_table(labels))
        prompts = self.dropout(self.prompt_table()[0])
        if batch_size is not None:
            return prompts.unsqueeze(0).expand(batch_size, *prompts.shape)
        return prompts
