#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the browser test of the QC report
# (tests/test_report.py). Idempotent; never fails: where it cannot install (not root, no
# apt-get, no network) it says why and exits 0, and that test skips with its reason.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install-chromium.sh: not root or no apt-get, Chromium not installed (the browser test will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null; then
    echo "install-chromium.sh: apt-get could not install chromium (the browser test will skip)" >&2
fi
exit 0
