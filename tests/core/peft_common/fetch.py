"""Obtain PEFT's own test-suite (the `tests/` folder of the PEFT source distribution) for the installed peft.

PEFT's wheel does not ship its tests, but its sdist does. `tests/core/test_peft_common.py` reuses
`testing_common.PeftCommonTester` from it, so this module downloads the sdist whose version matches the installed
peft (the `_test_*` helpers are private API and change between releases), extracts `peft-<version>/tests/` into
`tests/core/peft_upstream/` (git-ignored) and turns that folder into an importable package.

The download is skipped when `tests/core/peft_upstream/` already holds the tests of the installed version. Set
`HF_VPT_PEFT_SDIST=/path/to/peft-<version>.tar.gz` to use a local sdist instead of downloading one.

Run `python tests/core/peft_common/fetch.py` to fetch ahead of time (e.g. in a CI step).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath


UPSTREAM_DIR = Path(__file__).resolve().parents[1] / "peft_upstream"
VERSION_FILE = ".peft_version"
SDIST_ENV = "HF_VPT_PEFT_SDIST"
PIP_TIMEOUT_S = 600

_INIT_TEXT = '"""PEFT\'s test-suite, extracted by tests/core/peft_common/fetch.py from the PEFT sdist {version}."""\n'
_CONFTEST_TEXT = """
# Added by tests/core/peft_common/fetch.py. These are PEFT's own test modules; hf_vpt only imports their helpers
# (testing_common.py, testing_utils.py), so pytest must not collect them: they test PEFT itself and need the Hub.
collect_ignore_glob = ["test_*.py", "*_test.py"]
"""
# pip output that means "PyPI cannot be reached" (or has no such sdist): no point in a second attempt.
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeout",
    "ProxyError",
    "No matching distribution found",
    "Could not find a version",
)


class PeftTestsUnavailable(RuntimeError):
    """PEFT's test-suite could not be obtained (no network, no such sdist, ...); the message says why."""


def installed_peft_version() -> str:
    return importlib.metadata.version("peft")


def _is_current(target: Path, version: str) -> bool:
    version_file = target / VERSION_FILE
    return (
        version_file.is_file()
        and version_file.read_text(encoding="utf-8").strip() == version
        and (target / "testing_common.py").is_file()
        and (target / "__init__.py").is_file()
    )


@contextlib.contextmanager
def _exclusive(target: Path):
    """Serialise fetches of the same folder across processes (e.g. pytest-xdist workers)."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking, the final rename is still atomic
        yield
        return
    digest = hashlib.sha1(str(target).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"hf_vpt-peft-tests-{digest}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_sdist(version: str, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"peft=={version}",
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
    ]
    errors = []
    # pip prepares the metadata of an sdist even with --no-deps. In an isolated build environment that first
    # downloads and installs setuptools (~20 s); with the installed setuptools it takes ~2 s. Try that first and
    # fall back to pip's default isolated build when it fails (no or too old setuptools).
    for extra in (["--no-build-isolation"], []):
        try:
            result = subprocess.run(command + extra, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PeftTestsUnavailable(
                f"`pip download peft=={version}` did not finish in {PIP_TIMEOUT_S} s."
            ) from None
        found = sorted(dest.glob("peft-*.tar.gz"))
        if result.returncode == 0 and found:
            return found[0]
        output = (result.stderr or result.stdout).strip()
        error_lines = [line for line in output.splitlines() if line.startswith("ERROR")]
        errors.append(" ".join(error_lines) or output[-300:])
        if any(marker in output for marker in _NETWORK_ERRORS):
            break
    raise PeftTestsUnavailable(
        f"could not download the PEFT {version} sdist from PyPI (`pip download --no-deps --no-binary :all: "
        f"peft=={version}`); set {SDIST_ENV} to a local peft-{version}.tar.gz to use one. pip said: {errors[-1]}"
    )


def _extract_tests(sdist: Path, staging: Path) -> int:
    """Write the files under `<top>/tests/` of the sdist into `staging`; returns how many were written."""
    count = 0
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            parts = path.parts
            if not member.isfile() or path.is_absolute() or len(parts) < 3 or parts[1] != "tests":
                continue
            relative = parts[2:]
            if any(part in ("", ".", "..") for part in relative):
                continue
            out = staging.joinpath(*relative)
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source:
                out.write_bytes(source.read())
            count += 1
    return count


def _install(sdist: Path, version: str, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if not _extract_tests(sdist, staging) or not (staging / "testing_common.py").is_file():
            raise PeftTestsUnavailable(f"{sdist.name} has no tests/testing_common.py.")
        init = staging / "__init__.py"
        if not init.exists():
            init.write_text(_INIT_TEXT.format(version=version), encoding="utf-8")
        with open(staging / "conftest.py", "a", encoding="utf-8") as handle:
            handle.write(_CONFTEST_TEXT)
        (staging / VERSION_FILE).write_text(version + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_peft_tests(target: Path = UPSTREAM_DIR, version: str | None = None) -> Path:
    """Make `target` hold PEFT's tests for `version` (default: the installed peft); returns `target`.

    Raises `PeftTestsUnavailable` when they cannot be obtained.
    """
    version = version or installed_peft_version()
    target = Path(target)
    if _is_current(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        if _is_current(target, version):  # another process fetched it while we waited
            return target
        local = os.environ.get(SDIST_ENV)
        if local:
            if not Path(local).is_file():
                raise PeftTestsUnavailable(f"{SDIST_ENV}={local!r} is not a file.")
            _install(Path(local), version, target)
        else:
            with tempfile.TemporaryDirectory(prefix="peft-sdist-") as download_dir:
                _install(_download_sdist(version, Path(download_dir)), version, target)
    return target


def import_upstream(module: str = "testing_common", target: Path = UPSTREAM_DIR):
    """Fetch if needed and import one of PEFT's test modules, e.g. `import_upstream("testing_common")`.

    The folder is imported as the package `peft_upstream` (its parent, `tests/core/`, is put on `sys.path` as pytest
    does for this repository's test files); with the repository root on `sys.path`,
    `tests.core.peft_upstream.testing_common` works as well.
    """
    target = ensure_peft_tests(target)
    parent = str(target.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module(f"{target.name}.{module}")


if __name__ == "__main__":
    try:
        print(ensure_peft_tests())
    except PeftTestsUnavailable as exc:
        sys.exit(f"PEFT's tests are unavailable: {exc}")
