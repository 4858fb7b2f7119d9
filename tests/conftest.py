"""The shared pytest fixtures. The tiny models and inputs live in `hf_vpt.testing_utils` (examples and recipes'
`--tiny` modes import them too); tests import them from there.

The tests are grouped by subject: `core/` (surgery, registry, upstream guard, PEFT's common tests), `methods/<method>/`
(each method against its reference), `loading/` (saving, loading, cards, untrusted files), `recipes/` (recipes,
examples and reduced benches end to end) and `reliability/` (bad input, base untouched, crash/resume, sharding).
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_vpt.testing_utils import ARCHITECTURES  # noqa: E402


# PEFT's own test-suite, downloaded by tests/core/peft_common/fetch.py, is imported, never collected.
collect_ignore = ["core/peft_upstream"]


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models (on 2 shared cores it is several times faster than two); opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
