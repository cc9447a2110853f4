#!/usr/bin/env bash
# What only the tests need beyond the virtualenv: headless Chromium, which renders the HTML
# run report in tests/test_nightly.py (Debian package). `make test` runs this; `make demo`
# does not. Idempotent.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install: Debian chromium (headless report check in the tests)"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "install: WARNING could not install chromium; the report rendering test will fail"
else
  echo "install: WARNING chromium not found (apt-get install chromium); the report rendering test needs it"
fi
