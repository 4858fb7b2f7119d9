"""Helpers to run PEFT's own common test-suite against hf_vpt's methods (see `fetch.py`)."""
