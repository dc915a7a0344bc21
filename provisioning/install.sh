#!/usr/bin/env bash
# Install edge-agent on this device, or into an image tree with --root DIR.
# Run it again to update: the result is the same tree (config, keys and state are kept).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install.sh [OPTIONS]
Install edge-agent: the system user (sysusers.d), a venv under /opt/edge-agent with the
project pip-installed, /etc/edge-agent/config.yaml from the template (never overwritten),
/etc/edge-agent/tls/, the systemd unit, the Coral udev rules; then enable and start it.

  --root DIR              install into the image tree DIR; the running system is not
                          touched (the user is created at first boot by sysusers.d)
  --source DIR|WHEEL      the project to install (default: the repository this script is in)
  --extras LIST           pip extras, comma-separated (default: litert,video,serial;
                          32-bit ARM has no ai-edge-litert: use video,serial)
  --python PATH           interpreter for the venv (default: python3)
  --system-site-packages  the venv also sees the system's Python packages (picamera2,
                          Coral's python3-pycoral, or the dependencies for --no-deps)
  --no-deps               pip installs the project only; its dependencies must already
                          be importable (offline images, tests)
  --device-id ID          device.id of a new config (default: the hostname; with --root:
                          unset, so each device uses its own hostname at run time)
  --registry URL          registry.url of a new config (https://…, http://… or file:///…)
  --model NAME            model.name of a new config; without --registry and --model the
                          new config is incomplete and the service is enabled, not started
  --no-start              do not enable or start the service
  --uninstall             remove the unit, the venv and the udev rules; keep config,
                          keys, state and the user
  --purge                 with --uninstall: also remove config, keys, state and the
                          sysusers.d/tmpfiles.d entries (a live system keeps the user)
  -h, --help              this help
pip honours PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX for mirrors and offline installs.
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() {
  printf 'install.sh: %s\n' "$1" >&2
  exit "${2:-1}"
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
ROOT=""
IN_TREE=0
SOURCE=$REPO
EXTRAS="litert,video,serial"
PYTHON=python3
SYSTEM_SITE=0
NO_DEPS=0
DEVICE_ID=""
REGISTRY_URL=""
MODEL_NAME=""
CONFIG_OK=1
START=1
UNINSTALL=0
PURGE=0
# Device ids become MQTT topic levels and the certificate's CN (see provisioning/README.md).
ID_PATTERN='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'

need_value() { [ $# -ge 2 ] || die "$1 needs a value" 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --root) need_value "$@"; ROOT=$2; IN_TREE=1; shift ;;
    --source) need_value "$@"; SOURCE=$2; shift ;;
    --extras) need_value "$@"; EXTRAS=$2; shift ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    --device-id) need_value "$@"; DEVICE_ID=$2; shift ;;
    --registry) need_value "$@"; REGISTRY_URL=$2; shift ;;
    --model) need_value "$@"; MODEL_NAME=$2; shift ;;
    --system-site-packages) SYSTEM_SITE=1 ;;
    --no-deps) NO_DEPS=1 ;;
    --no-start) START=0 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" 2 ;;
  esac
  shift
done

[ "$PURGE" -eq 0 ] || [ "$UNINSTALL" -eq 1 ] || die "--purge goes with --uninstall" 2
# Plain values only: they are written into the YAML template as they are.
if [ -n "$REGISTRY_URL" ] && ! [[ $REGISTRY_URL =~ ^(https?|file)://[^[:space:]\'\"#{}]+$ ]]; then
  die "--registry '$REGISTRY_URL': not a URL (https://…, http://… or file:///…)" 2
fi
if [ -n "$MODEL_NAME" ] && ! [[ $MODEL_NAME =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]]; then
  die "--model '$MODEL_NAME': use letters, digits, '.', '_' and '-'" 2
fi
if [ "$IN_TREE" -eq 1 ]; then
  [ -n "$ROOT" ] || die "--root needs a directory" 2
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  ROOT=${ROOT%/} # --root / gives paths like /etc/…, still without touching the running system
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (or use --root DIR to fill an image tree)"
fi
if [ -n "$DEVICE_ID" ] && { ! [[ $DEVICE_ID =~ $ID_PATTERN ]] || [ "$DEVICE_ID" = groups ]; }; then
  die "invalid device id '$DEVICE_ID': letters, digits, '.', '_', '-' (at most 128, not 'groups')" 2
fi

UNIT=/etc/systemd/system/edge-agent.service
WANTS=/etc/systemd/system/multi-user.target.wants/edge-agent.service
SYSUSERS=/etc/sysusers.d/edge-agent.conf
TMPFILES=/etc/tmpfiles.d/edge-agent.conf
UDEV=/etc/udev/rules.d/65-edge-agent.rules
VENV=/opt/edge-agent/venv
ETC=/etc/edge-agent
STATE=/var/lib/edge-agent

live() { [ "$IN_TREE" -eq 0 ]; }

remove() { # PATH...: remove files or folders under ROOT, one line each
  local path
  for path in "$@"; do
    if [ -e "$ROOT$path" ] || [ -L "$ROOT$path" ]; then
      rm -rf -- "$ROOT$path"
      say "removed $ROOT$path"
    fi
  done
}

uninstall() {
  if live && command -v systemctl >/dev/null 2>&1; then
    say "systemctl disable --now edge-agent.service"
    systemctl disable --now edge-agent.service 2>/dev/null || true
  fi
  remove "$WANTS" "$UNIT" "$VENV" "$UDEV"
  rmdir "$ROOT/opt/edge-agent" 2>/dev/null && say "removed $ROOT/opt/edge-agent"
  if [ "$PURGE" -eq 1 ]; then
    remove "$ETC" "$STATE" "$SYSUSERS" "$TMPFILES"
    live && id edge-agent >/dev/null 2>&1 &&
      say "kept user edge-agent (files may still belong to it): userdel edge-agent removes it"
  else
    say "kept $ROOT$ETC (config, keys), $ROOT$STATE (models, outbox) and the user; --purge removes them"
  fi
  if live; then
    if command -v systemctl >/dev/null 2>&1; then
      say "systemctl daemon-reload"
      systemctl daemon-reload
    fi
    if command -v udevadm >/dev/null 2>&1; then
      say "udevadm control --reload"
      udevadm control --reload 2>/dev/null || true
    fi
  fi
}

if [ "$UNINSTALL" -eq 1 ]; then
  uninstall
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT

# --- the user: sysusers.d, so an image creates it at first boot and a live system now
install -D -m 0644 "$REPO/systemd/edge-agent.sysusers" "$ROOT$SYSUSERS"
say "user edge-agent and its groups: $ROOT$SYSUSERS"
install -D -m 0644 "$REPO/systemd/edge-agent.tmpfiles" "$ROOT$TMPFILES"
say "owners and modes of /etc/edge-agent: $ROOT$TMPFILES"
if live; then
  command -v systemd-sysusers >/dev/null 2>&1 || die "systemd-sysusers not found: edge-agent needs systemd"
  systemd-sysusers "$SYSUSERS"
  say "systemd-sysusers: user edge-agent ($(id edge-agent))"
fi

# --- the venv and the project
PYVERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
  die "no Python at '$PYTHON' (--python)"
venv_args=()
[ "$SYSTEM_SITE" -eq 0 ] || venv_args+=(--system-site-packages)
if [ -x "$ROOT$VENV/bin/python" ] &&
  [ "$("$ROOT$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$PYVERSION" ]; then
  # Reused: pyvenv.cfg follows the options of this run; pip is already in it.
  "$PYTHON" -m venv --without-pip "${venv_args[@]}" "$ROOT$VENV"
  say "venv (kept, Python $PYVERSION): $ROOT$VENV"
else
  "$PYTHON" -c 'import ensurepip' 2>/dev/null ||
    die "$PYTHON cannot make a venv with pip (Debian: apt-get install python3-venv)"
  "$PYTHON" -m venv --clear "${venv_args[@]}" "$ROOT$VENV"
  say "venv (new, Python $PYVERSION): $ROOT$VENV"
fi

if [ -d "$SOURCE" ]; then
  [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE: no pyproject.toml there"
  # Build from a copy: the source may be read-only, and a stale build/ would leak into the wheel.
  tar -C "$SOURCE" --exclude=.git --exclude=.venv --exclude=build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude='.*_cache' -cf - . | tar -C "$WORK" -xf -
  requirement=$WORK
elif [ -f "$SOURCE" ] && [[ $SOURCE == *.whl ]]; then
  requirement=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")
else
  die "--source $SOURCE: not a project folder or a .whl file" 2
fi
[ -z "$EXTRAS" ] || requirement="${requirement}[$EXTRAS]"
pip_args=(install --disable-pip-version-check --no-input --quiet)
[ "$NO_DEPS" -eq 0 ] || pip_args+=(--no-deps)
"$ROOT$VENV/bin/python" -m pip "${pip_args[@]}" "$requirement"
say "pip install $SOURCE${EXTRAS:+[$EXTRAS]}$([ "$NO_DEPS" -eq 0 ] || echo ' --no-deps'): $ROOT$VENV/bin/edge-agent"

if [ -n "$ROOT" ]; then
  # Scripts and activate files name the venv by its path in this tree; on the device it is
  # /opt/edge-agent/venv. A script finds its python next to itself, wherever the tree is.
  tree_venv=$ROOT$VENV
  tree_venv_re=$(printf '%s' "$tree_venv" | sed 's/[][\.*^$|]/\\&/g')
  for script in "$tree_venv"/bin/* "$tree_venv/pyvenv.cfg"; do
    if [ -L "$script" ] || [ ! -f "$script" ]; then
      continue
    fi
    first=$(head -n 1 "$script")
    if [[ $first == "#!$tree_venv/bin/python"* ]]; then
      {
        printf '#!/bin/sh\n'
        # pip's own trick for long paths, with the python found next to the script.
        # shellcheck disable=SC2016  # $0 and $@ belong to the script's /bin/sh
        printf '%s\n' "'''exec' \"\$(dirname -- \"\$(readlink -f -- \"\$0\")\")/python\" \"\$0\" \"\$@\"" "' '''"
        tail -n +2 "$script"
      } >"$WORK/script"
      cat "$WORK/script" >"$script"
    elif grep -qF "$tree_venv" "$script"; then
      sed -i "s|$tree_venv_re|$VENV|g" "$script"
    fi
  done
  say "venv paths: $VENV (as on the device)"
fi

# --- config (the operator's once written), TLS folder
install -d -m 0755 "$ROOT$ETC"
if [ -e "$ROOT$ETC/config.yaml" ]; then
  say "config kept (never overwritten): $ROOT$ETC/config.yaml${DEVICE_ID:+ (--device-id not applied)}"
else
  if [ -z "$DEVICE_ID" ] && live; then
    DEVICE_ID=$(uname -n)
    if ! [[ $DEVICE_ID =~ $ID_PATTERN ]] || [ "$DEVICE_ID" = groups ]; then
      die "the hostname '$DEVICE_ID' is not a valid device id: pass --device-id ID" 2
    fi
  fi
  if [ -n "$DEVICE_ID" ]; then
    sed "s/@DEVICE_ID@/$DEVICE_ID/g" "$HERE/config.yaml.in" >"$WORK/config.yaml"
  else
    sed -e 's/^  id: @DEVICE_ID@$/  # id: DEVICE-ID            # unset: the hostname at run time/' \
      -e 's/@DEVICE_ID@/DEVICE-ID/g' "$HERE/config.yaml.in" >"$WORK/config.yaml"
  fi
  # sed replacement text: escape the delimiter, & and backslashes (the values are checked
  # by check-config below, not here)
  sed_text() { printf '%s' "$1" | sed -e 's/[|&\\]/\\&/g'; }
  if [ -n "$REGISTRY_URL" ]; then
    sed -i "s|^  # url: https://models.example.com/\$|  url: $(sed_text "$REGISTRY_URL")|" "$WORK/config.yaml"
  fi
  if [ -n "$MODEL_NAME" ]; then
    sed -i "s|^  # name: person-detector\$|  name: $(sed_text "$MODEL_NAME")|" "$WORK/config.yaml"
  fi
  install -m 0640 "$WORK/config.yaml" "$ROOT$ETC/config.yaml.new"
  mv -f "$ROOT$ETC/config.yaml.new" "$ROOT$ETC/config.yaml"
  say "config (device id: ${DEVICE_ID:-the hostname}): $ROOT$ETC/config.yaml"
fi
install -d -m 0750 "$ROOT$ETC/tls"
say "TLS folder (device-identity.sh fills it): $ROOT$ETC/tls"
if live; then
  systemd-tmpfiles --create "$TMPFILES"
  say "systemd-tmpfiles: $ETC and $ETC/tls readable by group edge-agent"
  # The state folder is the unit's StateDirectory=: systemd makes it, owned by the user.
  CONFIG_OK=1
  "$VENV/bin/edge-agent" check-config --config "$ETC/config.yaml" || {
    CONFIG_OK=0
    say "warning: $ETC/config.yaml is not complete or not valid (see above): the service is"
    say "enabled but not started; fix it, run edge-agent check-config, then systemctl start edge-agent"
  }
fi

# --- the unit and the udev rules
# /etc, not /usr/lib: this is the administrator's install, not a distribution package.
install -D -m 0644 "$REPO/systemd/edge-agent.service" "$ROOT$UNIT"
say "unit: $ROOT$UNIT"
install -D -m 0644 "$REPO/systemd/edge-agent.rules" "$ROOT$UDEV"
say "udev rules (Coral Edge TPU → groups apex, plugdev): $ROOT$UDEV"

if ! live; then
  if [ "$START" -eq 1 ]; then
    # What `systemctl enable` does for WantedBy=multi-user.target, without a running systemd.
    mkdir -p "$(dirname "$ROOT$WANTS")"
    ln -sfn "$UNIT" "$ROOT$WANTS"
    say "enabled at boot: $ROOT$WANTS"
  fi
  say "done: ${ROOT:-/} (the user is created at first boot)"
  exit 0
fi

if command -v udevadm >/dev/null 2>&1 && udevadm control --reload 2>/dev/null; then
  udevadm trigger --action=add --subsystem-match=apex --subsystem-match=usb || true
  say "udevadm: rules reloaded, Coral devices re-triggered"
else
  say "udev not running: the rules apply at next boot"
fi
systemctl daemon-reload
say "systemctl daemon-reload"
if [ "$START" -eq 1 ] && [ "$CONFIG_OK" -eq 0 ]; then
  systemctl enable edge-agent.service
  say "systemctl enable edge-agent.service: not started until the config is valid"
elif [ "$START" -eq 1 ]; then
  systemctl enable edge-agent.service
  # restart, not start: a re-install must run the new code. Returns once READY=1 came.
  systemctl restart edge-agent.service ||
    die "edge-agent did not start: journalctl -u edge-agent -n 50 (exit 78: fix the config)"
  say "systemctl enable + restart edge-agent.service: running (journalctl -u edge-agent -f)"
else
  say "not started (--no-start): systemctl enable --now edge-agent"
fi
