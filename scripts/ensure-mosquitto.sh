#!/usr/bin/env bash
# Install the Mosquitto broker (Debian package) if it is not on this machine.
# Used by `make demo` and `make test`; needs root (or sudo) only when something is missing.
set -euo pipefail
# Debian installs mosquitto in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"
if command -v mosquitto >/dev/null 2>&1 && command -v mosquitto_passwd >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "mosquitto is missing and this user cannot install it: run 'apt-get install mosquitto' as root" >&2
        exit 1
    fi
fi
echo "installing mosquitto (Debian package)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
# The Debian package enables a system-wide broker on port 1883; fedbus never uses it
# (tests and the demo start their own on a free port), so leave it alone.
command -v mosquitto >/dev/null
