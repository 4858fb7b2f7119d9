"""Model cards for saved adapters."""

from __future__ import annotations

def write_model_card(save_directory, config):
    pass
