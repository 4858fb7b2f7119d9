#!/usr/bin/env bash
# The upstream-drift check: run the fast subset of the tests against the NEWEST releases of transformers, peft,
# diffusers and accelerate that pyproject.toml allows, and against the OLDEST ones it declares (its `>=` bounds).
# Each run gets a throw-away venv (.venv-upstream-newest, .venv-upstream-oldest); the locked .venv is not touched.
#
#   bash scripts/check_upstream.sh            # both
#   bash scripts/check_upstream.sh newest     # one of them
#   PYTEST_ARGS="-x" bash scripts/check_upstream.sh oldest
#
# A failure names the packages and versions that differ from the lock (constraints.txt) and the tests that broke.
# After a green run, update the lock (`.venv/bin/pip freeze --exclude-editable > constraints.txt` after
# `pip install -U` in .venv), hf_vpt/_compat.py's VERIFIED and the README's compatibility table.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PACKAGES=(transformers peft diffusers accelerate)
# Every method x every architecture forward, save/load, cached sampling, the key/value-prefix equality tests.
SUBSET=(
  tests/core/test_upstream_compat.py
  tests/core/test_kv_prefix.py
  tests/methods/visual_prompt/test_visual_prompt_reference.py
  tests/methods/visual_prompt/test_visual_prompt_peft.py
  tests/methods/gated_prompt/test_gated_prompt.py
  tests/methods/approx_prompt/test_approx_prompt.py
  tests/methods/generative_prompt/test_generative_prompt.py
  tests/methods/generative_prompt/test_generative_prefix_cache.py
  tests/methods/generative_prompt/test_generative_guidance.py
  tests/methods/approx_prompt/test_diffusers_text_encoder.py
  tests/reliability/test_base_untouched.py
  tests/core/test_peft_common.py
  tests/recipes/test_recipes_more.py
  tests/reliability/test_crash_resume.py
)
if [ $# -eq 0 ]; then set -- newest oldest; fi

oldest_pins() {
  # `pkg==X` for each of PACKAGES, X being the `pkg>=X` bound of pyproject.toml
  "$PYTHON" - "${PACKAGES[@]}" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for package in sys.argv[1:]:
    bound = next((re.search(r">=\s*([^,\s]+)", d) for d in deps if re.match(rf"{package}\s*[<>=]", d)), None)
    if bound is None:
        sys.exit(f"pyproject.toml declares no lower bound for {package}")
    print(f"{package}=={bound.group(1)}")
EOF
}

locked_version() {
  sed -n "s/^$1==//p" constraints.txt 2>/dev/null | head -1
}

status=0
for mode in "$@"; do
  venv=".venv-upstream-$mode"
  echo "== upstream drift check: $mode releases ($venv) =="
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC"
  case "$mode" in
    newest) pins=() ;;
    oldest) mapfile -t pins < <(oldest_pins) ;;
    *) echo "unknown mode '$mode' (newest or oldest)" >&2; exit 2 ;;
  esac
  if ! "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" "${pins[@]}" "$TORCH_SPEC"; then
    echo "!! $mode: pip could not install hf_vpt with ${pins[*]:-the newest releases}" >&2
    status=1
    continue
  fi
  versions=""
  for package in "${PACKAGES[@]}"; do
    have=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$package'))")
    lock=$(locked_version "$package")
    versions+="$package $have"
    [ -n "$lock" ] && [ "$lock" != "$have" ] && versions+=" (lock: $lock)"
    versions+="; "
  done
  echo "   $versions"
  report="$venv/failures.txt"
  if HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${SUBSET[@]}" \
    >"$venv/pytest.log" 2>&1; then
    tail -n 1 "$venv/pytest.log"
    echo "== $mode: passed with $versions"
  else
    tail -n 1 "$venv/pytest.log"
    grep -E '^(FAILED|ERROR) ' "$venv/pytest.log" | sed 's/ - .*//' >"$report" || true
    echo "!! $mode: hf_vpt broke with $versions" >&2
    echo "!! failing tests ($(wc -l <"$report")):" >&2
    head -n 40 "$report" | sed 's/^/     /' >&2
    status=1
  fi
done
exit "$status"
