#!/usr/bin/env bash
# ensure-package.sh PACKAGE COMMAND...: install the Debian PACKAGE unless every COMMAND is
# already on this machine. Used by the Makefile for mosquitto (`make demo`, `make test`) and
# for chromium (`make test`: the dashboard's browser test drives /usr/bin/chromium through
# Playwright, whose own browser download needs a network we do not assume). Needs root, or
# sudo, only when something is missing.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 PACKAGE COMMAND..." >&2
    exit 2
fi
package="$1"
shift
# Debian installs mosquitto in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"
missing=0
for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 || missing=1
done
[ "$missing" -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "$package is missing and this user cannot install it: run 'apt-get install $package' as root" >&2
        exit 1
    fi
fi
echo "installing $package (Debian package)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null
for command in "$@"; do
    command -v "$command" >/dev/null
done
# The mosquitto package enables a system-wide broker on port 1883; fedbus never uses it
# (tests and the demo start their own on a free port), so it is left alone.
