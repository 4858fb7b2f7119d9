"""A training run killed with SIGKILL in the middle of a step and resumed from its last `accelerate` checkpoint
ends with exactly the prompts of an uninterrupted run (issue 7).

The run itself is `tests/reliability/crash_resume_train_script.py`: the recipes' shared loop and checkpoints
(`recipes/training.py`) training VPT-deep with prompt dropout and a head on a tiny ViT (CPU, float32, fixed seeds, a
shuffled loader over two and a half epochs, a checkpoint every 3 steps). Each
run is a separate Python process, as after a real crash: the reference and the doomed run go side by side, then a
third process resumes the doomed one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = Path(__file__).with_name("crash_resume_train_script.py")
STEPS = 12
SAVE_EVERY = 3
CRASH_AT = 8  # two steps after the checkpoint of step 6, in the middle of the second epoch (5 batches each)
TIMEOUT_S = 300


def _launch(workdir: Path, *extra: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        str(SCRIPT),
        "--workdir",
        str(workdir),
        "--steps",
        str(STEPS),
        "--save-every",
        str(SAVE_EVERY),
        *extra,
    ]
    output = open(workdir / f"output{'_resume' if '--resume' in extra else ''}.txt", "w")
    try:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=SCRIPT.parent.parent, env=env)
    finally:
        output.close()  # the child keeps its own handle


def _tail(workdir: Path) -> str:
    texts = [path.read_text()[-3000:] for path in sorted(workdir.glob("output*.txt"))]
    return "\n".join(texts)


def _finish(process: subprocess.Popen, workdir: Path) -> None:
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"training process in {workdir} did not finish in {TIMEOUT_S} s:\n{_tail(workdir)}")
    assert process.returncode == 0, f"training process in {workdir} failed:\n{_tail(workdir)}"


def _kill_when_marked(process: subprocess.Popen, workdir: Path, marker: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run exited ({process.returncode}) before reaching step {CRASH_AT}:\n{_tail(workdir)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the run did not reach step {CRASH_AT} in {TIMEOUT_S} s:\n{_tail(workdir)}")
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference = _launch(reference_dir)
    crashed = _launch(crashed_dir, "--crash-at-step", str(CRASH_AT))
    try:
        _kill_when_marked(crashed, crashed_dir, crashed_dir / f"crashed_at_step_{CRASH_AT}")
    except BaseException:
        for process in (crashed, reference):
            if process.poll() is None:
                process.kill()
                process.wait()
        raise

    # The kill came mid-step: only the complete checkpoints before it exist, and no result was written.
    checkpoints = sorted(p.name for p in crashed_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"], checkpoints
    # adapter-only: the prompts and the head, not the frozen ViT
    saved = load_file(crashed_dir / "checkpoint-6" / "model.safetensors")
    assert sorted(saved) == sorted(load_file(crashed_dir / "initial.safetensors"))
    assert not (crashed_dir / "final.safetensors").exists()

    resumed = _launch(crashed_dir, "--resume")
    _finish(resumed, crashed_dir)
    _finish(reference, reference_dir)

    expected = load_file(reference_dir / "final.safetensors")
    got = load_file(crashed_dir / "final.safetensors")
    initial = load_file(reference_dir / "initial.safetensors")
    assert sorted(got) == sorted(expected)
    assert any("visual_prompt_bank" in key for key in expected)
    for key, value in expected.items():
        assert not torch.equal(value, initial[key]), f"{key} did not train; the comparison would prove nothing"
        assert got[key].dtype == value.dtype == torch.float32
        assert torch.equal(got[key], value), f"{key} differs after crash + resume"

    # The resumed process picked up at the step after the checkpoint, with the same batches and the same losses
    # (prompt dropout draws from the restored RNG), bit for bit.
    reference_log = json.loads((reference_dir / "log.json").read_text())
    resumed_log = json.loads((crashed_dir / "log.json").read_text())
    assert sorted(map(int, resumed_log)) == list(range(7, STEPS + 1))
    for step, entry in resumed_log.items():
        assert entry == reference_log[step], f"step {step}: {entry} vs {reference_log[step]}"
