"""Pretrain once, reuse afterwards: a model cache keyed by a hash of everything the pretraining depends on.

    backbone = cached_pretraining(accelerator, cache_dir, "digits_vit", settings, pretrain)

`pretrain()` runs on every process (it may be distributed) and returns `(model, info)`; the main process saves the
model with `save_pretrained` and `info` (JSON) as pretraining.json into `<cache_dir>/<name>_<hash of settings>`,
written into a staging folder and renamed, so an interrupted run never leaves a half-written cache entry behind.
Changing any setting changes the hash, so a stale backbone is never reused. Every study in examples/ uses it: the
supervised and MAE ViTs here (`digits_vit`, `digits_vit_mae`), the Swin of examples/swin_digits (`digits_swin`) and the
generators of the two generative studies (`digits_imagegpt`, `digits_uvit2d`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable


INFO_FILE = "pretraining.json"


def settings_key(settings: dict) -> str:
    """12 hex digits of the SHA-256 of the settings (sorted JSON): the cache entry's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cache_folder(cache_dir: str, name: str, settings: dict) -> str:
    return os.path.join(os.path.expanduser(cache_dir), f"{name}_{settings_key(settings)}")


def cached_pretraining(accelerator, cache_dir: str, name: str, settings: dict, pretrain: Callable) -> dict:
    """The cached model for `settings` if there is one, else `pretrain()` now and cache it.

    Returns `{"path": folder, "reused": bool, **info}`, `info` being what `pretrain` returned (and saved) with the
    model, plus `settings`.
    """
    folder = cache_folder(cache_dir, name, settings)
    info_path = os.path.join(folder, INFO_FILE)
    accelerator.wait_for_everyone()  # every process decides before the main one may write the cache
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as handle:
            return {"path": folder, "reused": True, **json.load(handle)}
    model, info = pretrain()
    info = {**info, "settings": settings}
    if accelerator.is_main_process:
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}_", dir=parent)
        model.save_pretrained(staging)
        with open(os.path.join(staging, INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    accelerator.wait_for_everyone()
    return {"path": folder, "reused": False, **info}
