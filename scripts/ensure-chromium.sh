#!/usr/bin/env bash
# Install Debian's Chromium if it is not on this machine: the dashboard's browser test
# (tests/test_system.py) drives it headless through Playwright, which is told to use
# /usr/bin/chromium (Playwright's own browser download needs a network we do not assume).
# Used by `make test`; needs root (or sudo) only when something is missing.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "chromium is missing and this user cannot install it: run 'apt-get install chromium' as root" >&2
        exit 1
    fi
fi
echo "installing chromium (Debian package, for the dashboard's browser test)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
test -x /usr/bin/chromium
