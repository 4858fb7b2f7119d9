"""Jinja templates of the README.md written next to a saved hf_vpt adapter (installed as `hf_vpt.model_cards`)."""
