#!/usr/bin/env bash
# Install the fedbus edge agent on a device as a hardened systemd service: one command.
# deploy/README.md describes what it does; --help lists the options.
set -euo pipefail

# Keep in step with pyproject.toml (dependencies) and the Makefile (TORCH_PIN);
# tests/test_install.py checks that the three agree.
TORCH_PIN="torch==2.13.0"
DEFAULT_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

here="$(cd "$(dirname "$0")" && pwd)"
unit_template="$here/systemd/fedbus-agent.service"

usage() {
    cat <<EOF
Usage: $(basename "$0") --bundle DIR [options]

Install the fedbus edge agent as the systemd service fedbus-agent, in one command (as root):
  1. a virtualenv (default /opt/fedbus/venv) with a CPU-only $TORCH_PIN and fedbus without
     its server extras (no scikit-learn, matplotlib, dp-accounting, prometheus-client);
  2. the system user fedbus;
  3. /etc/fedbus from the device's bundle (\`fedbus devices add\`): agent.env (0600),
     credentials.json and the device's key (0640 root:fedbus), the certificates (0644);
     /var/lib/fedbus/data for the local training data, /var/lib/fedbus/state for the state;
  4. /etc/systemd/system/fedbus-agent.service (hardened, restarts on failure), then
     systemctl enable and (re)start it when systemd runs here.
Running it again upgrades fedbus in the same virtualenv and replaces the configuration.

Options:
  --bundle DIR          the device's bundle directory from \`fedbus devices add\` (needed the
                        first time; without it an existing /etc/fedbus is kept)
  --data PATH           the local training data, .csv/.npz or a directory of them, as seen on
                        the device (default /var/lib/fedbus/data)
  --venv DIR            where the virtualenv goes (default /opt/fedbus/venv); an existing one
                        is reused
  --root DIR            install under DIR instead of / (staging, tests): no systemctl; the
                        user is added to DIR/etc/passwd when that file exists
  --from SPEC           what pip installs as fedbus: a checkout or a wheel (default: the
                        checkout this script is in, $(cd "$here/.." && pwd))
  --python PYTHON       the interpreter for the virtualenv, 3.11 or newer (default python3)
  --system-site-packages
                        let the virtualenv see the interpreter's own packages (for example
                        a torch the system already has)
  --torch-index URL     the index the CPU torch comes from (default $DEFAULT_TORCH_INDEX,
                        or \$FEDBUS_TORCH_INDEX); '' uses pip's own configured index
  --no-torch            skip that step: torch then comes with fedbus's own dependencies
                        (pinned, from pip's index) or is already there
  --user NAME           the service's account (default fedbus)
  --no-start            install, but neither enable nor start the service
  -h, --help            this text
EOF
}

die() {
    echo "install-agent: error: $*" >&2
    exit 2
}
say() {
    echo "install-agent: $*"
}

bundle=""
data="/var/lib/fedbus/data"
venv="/opt/fedbus/venv"
root="/"
source_spec="$(cd "$here/.." && pwd)"
python="python3"
system_site=0
torch_index="${FEDBUS_TORCH_INDEX-$DEFAULT_TORCH_INDEX}"
with_torch=1
user="fedbus"
start=1

need_value() {
    [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"
}
while [ "$#" -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --bundle) need_value "$@"; bundle="$2"; shift 2 ;;
        --data) need_value "$@"; data="$2"; shift 2 ;;
        --venv) need_value "$@"; venv="$2"; shift 2 ;;
        --root) need_value "$@"; root="$2"; shift 2 ;;
        --from) need_value "$@"; source_spec="$2"; shift 2 ;;
        --python) need_value "$@"; python="$2"; shift 2 ;;
        --system-site-packages) system_site=1; shift ;;
        --torch-index) need_value "$@"; torch_index="$2"; shift 2 ;;
        --no-torch) with_torch=0; shift ;;
        --user) need_value "$@"; user="$2"; shift 2 ;;
        --no-start) start=0; shift ;;
        --bundle=*|--data=*|--venv=*|--root=*|--from=*|--python=*|--torch-index=*|--user=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# -- checks before anything is written -------------------------------------------------------
case "$venv" in /*) ;; *) die "--venv must be an absolute path, not $venv" ;; esac
case "$root" in /*) ;; *) die "--root must be an absolute path, not $root" ;; esac
case "$venv" in *[[:space:]\|]*) die "--venv must not hold spaces or |: $venv" ;; esac
root="${root%/}"  # "" for /, so "$root$venv" is the path on this machine
case "$user" in [a-z_]*) ;; *) die "--user: $user is not a valid user name" ;; esac
[ -f "$unit_template" ] || die "the unit file $unit_template is missing"
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or stage into a directory with --root DIR)"
fi
if [ -n "$bundle" ]; then
    [ -f "$bundle/credentials.json" ] || die "$bundle is not a bundle directory from \`fedbus devices add\` (no credentials.json)"
    bundle="$(cd "$bundle" && pwd)"
elif [ ! -f "$root/etc/fedbus/agent.env" ]; then
    die "--bundle DIR is needed the first time (the device's bundle from \`fedbus devices add\`)"
fi
if [ "$with_torch" -eq 1 ]; then
    case "$(uname -m)" in
        x86_64|aarch64|arm64) ;;
        *) die "PyTorch publishes no wheels for $(uname -m): use a 64-bit OS (aarch64), or --no-torch with a torch this Python already has" ;;
    esac
fi
target="$root$venv"
if [ ! -x "$target/bin/python" ]; then
    command -v "$python" >/dev/null 2>&1 || die "no $python here: install python3 (3.11 or newer) and python3-venv"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is $("$python" -c 'import platform; print(platform.python_version())'); fedbus needs 3.11 or newer"
fi

# -- 1. the virtualenv -------------------------------------------------------------------------
if [ -x "$target/bin/python" ]; then
    say "reusing the virtualenv $target"
else
    say "creating the virtualenv $target"
    venv_args=()
    [ "$system_site" -eq 1 ] && venv_args+=(--system-site-packages)
    "$python" -m venv "${venv_args[@]}" "$target" \
        || die "could not create a virtualenv with $python (on Debian: apt-get install python3-venv)"
fi
py="$target/bin/python"
"$py" -m pip --version >/dev/null 2>&1 || die "the virtualenv $target has no pip"
pip=("$py" -m pip install --quiet)

if [ "$with_torch" -eq 1 ]; then
    if [ -n "$torch_index" ]; then
        say "installing $TORCH_PIN (CPU) from $torch_index"
        "${pip[@]}" "$TORCH_PIN" --index-url "$torch_index"
    else
        say "installing $TORCH_PIN from pip's configured index"
        "${pip[@]}" "$TORCH_PIN"
    fi
fi
say "installing fedbus (agent, no server extras) from $source_spec"
"${pip[@]}" --upgrade "$source_spec"
"$py" -m fedbus agent --help >/dev/null || die "the installed agent does not start: $py -m fedbus agent --help"

# -- 2. the system user ------------------------------------------------------------------------
home="/var/lib/fedbus"
useradd_args=(--system --user-group --home-dir "$home" --no-create-home --shell /usr/sbin/nologin)
if [ "$(id -u)" -ne 0 ]; then
    say "not root: no user $user created, and files stay owned by $(id -un)"
elif [ -z "$root" ]; then
    if id "$user" >/dev/null 2>&1; then
        say "user $user exists"
    else
        say "creating the system user $user"
        useradd "${useradd_args[@]}" "$user"
    fi
elif [ -f "$root/etc/passwd" ]; then
    if grep -q "^$user:" "$root/etc/passwd"; then
        say "user $user exists in $root/etc/passwd"
    else
        say "creating the system user $user in $root/etc/passwd"
        useradd --prefix "$root" "${useradd_args[@]}" "$user"
    fi
else
    say "no $root/etc/passwd: no user $user created (create it on the device)"
fi

# -- 3. /etc/fedbus and /var/lib/fedbus --------------------------------------------------------
if [ -n "$bundle" ]; then
    say "writing /etc/fedbus from the bundle $bundle"
    "$py" -m fedbus.device_install --bundle "$bundle" --data "$data" --root "${root:-/}" \
        --user "$user" | sed 's/^/  /'
else
    say "no --bundle: keeping $root/etc/fedbus as it is"
fi

# -- 4. the systemd unit -----------------------------------------------------------------------
unit="$root/etc/systemd/system/fedbus-agent.service"
mkdir -p "$(dirname "$unit")"
sed -e "s|^ExecStart=/opt/fedbus/venv/bin/python |ExecStart=$venv/bin/python |" \
    -e "s|^User=fedbus\$|User=$user|" -e "s|^Group=fedbus\$|Group=$user|" \
    "$unit_template" >"$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"
say "installed $unit"

if [ "$start" -eq 0 ]; then
    say "--no-start: start it with: systemctl enable --now fedbus-agent"
elif [ -n "$root" ]; then
    say "staged under $root: on the device, run: systemctl enable --now fedbus-agent"
elif [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
    say "systemd is not running here: start the agent with: systemctl enable --now fedbus-agent"
else
    systemctl daemon-reload
    systemctl enable fedbus-agent
    systemctl restart fedbus-agent
    say "fedbus-agent enabled and started; follow it with: journalctl -u fedbus-agent -f"
fi
say "done"
