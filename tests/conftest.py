"""pytest fixtures; the tiny models themselves live in `hf_vpt.testing_utils` (importable by examples too)."""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from hf_vpt.testing_utils import (  # noqa: E402, F401  (re-exported: the tests import them from conftest)
    ARCHITECTURES,
    COMMON,
    IMAGE,
    PATCH,
    build,
    main_output,
    model_inputs,
    pixels,
)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param
