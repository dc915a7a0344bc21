#!/usr/bin/env bash
# The device's TLS identity for the MQTT broker: a private key made on the device (it never
# leaves it), a CSR whose CN is the device id (the broker's ACL user name), and the
# certificate the fleet CA signs from it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: device-identity.sh [OPTIONS]
Make the device key (EC P-256, 0600; kept unless --force) and a CSR with CN = device id in
/etc/edge-agent/tls/ (device.key, device.csr); then either sign it with a fleet CA handed
to this script, or install the certificate the fleet signed from device.csr.

  --device-id ID        the CN (default: device.id in the config, else the hostname;
                        with --root: --device-id or device.id in the tree's config)
  --config FILE         config to read device.id from (default /etc/edge-agent/config.yaml)
  --dir DIR             where the files go (default /etc/edge-agent/tls)
  --root DIR            an image tree: files go to DIR/etc/edge-agent/tls (DIR/--dir)
  --force               replace an existing device key (its certificate is removed)
  --ca-cert FILE        the fleet CA certificate: installed as ca.pem (mqtt.ca); checks
                        the certificate of --ca-key or --cert (else an installed ca.pem does)
  --ca-key FILE         sign device.pem here with the fleet CA key (with --ca-cert)
  --days N              validity of a certificate signed here (default 825)
  --cert FILE           install FILE as device.pem after checking that it is for this
                        device's key and its CN is the device id
  -h, --help            this help
Exit codes: 0 done; 1 a check failed (nothing installed); 2 bad usage or device id.
EOF
}

say() { printf 'device-identity.sh: %s\n' "$*"; }
die() {
  printf 'device-identity.sh: %s\n' "$1" >&2
  exit "${2:-1}"
}
need_value() { [ $# -ge 2 ] || die "$1 needs a value" 2; }

ROOT=""
IN_TREE=0
DIR=/etc/edge-agent/tls
CONFIG=/etc/edge-agent/config.yaml
DEVICE_ID=""
FORCE=0
CA_CERT=""
CA_KEY=""
DAYS=825
CERT=""
# Device ids become MQTT topic levels and the ACL's %u: see provisioning/README.md.
ID_PATTERN='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'

while [ $# -gt 0 ]; do
  case $1 in
    --device-id) need_value "$@"; DEVICE_ID=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --dir) need_value "$@"; DIR=$2; shift ;;
    --root) need_value "$@"; ROOT=$2; IN_TREE=1; shift ;;
    --force) FORCE=1 ;;
    --ca-cert) need_value "$@"; CA_CERT=$2; shift ;;
    --ca-key) need_value "$@"; CA_KEY=$2; shift ;;
    --days) need_value "$@"; DAYS=$2; shift ;;
    --cert) need_value "$@"; CERT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" 2 ;;
  esac
  shift
done

command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"
[[ $DAYS =~ ^[1-9][0-9]{0,4}$ ]] || die "--days must be a number of days" 2
[ -z "$CA_KEY" ] || [ -n "$CA_CERT" ] || die "--ca-key needs --ca-cert" 2
[ -z "$CA_KEY" ] || [ -z "$CERT" ] || die "--ca-key signs a certificate, --cert installs one: not both" 2
for file in "$CA_CERT" "$CA_KEY" "$CERT"; do
  [ -z "$file" ] || [ -r "$file" ] || die "cannot read $file" 2
done
if [ "$IN_TREE" -eq 1 ]; then
  if [ -z "$ROOT" ] || [ ! -d "$ROOT" ]; then
    die "--root $ROOT: not a folder" 2
  fi
  ROOT=$(cd "$ROOT" && pwd)
  ROOT=${ROOT%/}
fi

# --- the device id
config_id() { # FILE: device.id of the config, if set (the device: section's id: key)
  [ -r "$1" ] || return 0
  awk '/^[^[:space:]#]/ { section = $1 }
       section == "device:" && $1 == "id:" { gsub(/["'\'']/, "", $2); print $2; exit }' "$1"
}
if [ -z "$DEVICE_ID" ]; then
  DEVICE_ID=$(config_id "$ROOT$CONFIG")
  if [ -z "$DEVICE_ID" ]; then
    # An image tree's device is not this machine: its hostname would be wrong there.
    [ "$IN_TREE" -eq 0 ] || die "with --root, pass --device-id (device.id is unset in $ROOT$CONFIG)" 2
    DEVICE_ID=$(uname -n)
  fi
fi
if [ "$DEVICE_ID" = groups ]; then
  die "invalid device id 'groups': reserved, edge/groups/… holds the groups' desired states" 2
elif ! [[ $DEVICE_ID =~ $ID_PATTERN ]]; then
  die "invalid device id '$DEVICE_ID': 1-128 letters, digits, '.', '_', '-', starting with a letter or digit (the CN is the broker's user name: 'a/b' would reach device a's topics)" 2
fi

TLS=$ROOT$DIR
KEY=$TLS/device.key
CSR=$TLS/device.csr
PEM=$TLS/device.pem
CA=$TLS/ca.pem
[ -d "$TLS" ] || install -d -m 0750 "$TLS"
WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT

pubkey_of_key() { openssl pkey -in "$1" -pubout; }
pubkey_of_cert() { openssl x509 -in "$1" -noout -pubkey; }
pubkey_of_csr() { openssl req -in "$1" -noout -pubkey; }
cn_of() { # KIND FILE: the CN of a certificate (x509) or CSR (req); empty if none
  local subject part
  subject=$(openssl "$1" -in "$2" -noout -subject -nameopt RFC2253) || return 1
  subject=${subject#subject=}
  local IFS=,
  for part in $subject; do
    [[ $part == CN=* ]] && printf '%s\n' "${part#CN=}" && return 0
  done
  return 0
}

# --- the key: made here, never overwritten without --force
if [ -e "$KEY" ] && [ "$FORCE" -eq 0 ]; then
  pubkey_of_key "$KEY" >/dev/null 2>&1 || die "$KEY exists but is not a private key (--force replaces it)"
  say "key kept: $KEY"
else
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out "$KEY.new" 2>/dev/null)
  chmod 0600 "$KEY.new"
  mv -f "$KEY.new" "$KEY"
  say "key made (EC P-256, 0600): $KEY"
  if [ -e "$PEM" ]; then
    rm -f "$PEM"
    say "removed $PEM: it was for the replaced key; install a new one"
  fi
fi
if [ "$IN_TREE" -eq 0 ] && [ "$(id -u)" -eq 0 ] && id edge-agent >/dev/null 2>&1; then
  chown edge-agent:edge-agent "$KEY"
  chgrp edge-agent "$TLS"
  say "key owner: edge-agent (the service's user; nobody else may read it)"
elif [ "$IN_TREE" -eq 1 ]; then
  say "key owner: set to edge-agent at boot (tmpfiles.d/edge-agent.conf)"
fi

# --- the CSR: kept while it matches the key and the device id
if [ -e "$CSR" ] && [ "$(pubkey_of_csr "$CSR" 2>/dev/null)" = "$(pubkey_of_key "$KEY")" ] &&
  [ "$(cn_of req "$CSR" 2>/dev/null)" = "$DEVICE_ID" ]; then
  say "CSR kept (CN=$DEVICE_ID): $CSR"
else
  openssl req -new -key "$KEY" -subj "/CN=$DEVICE_ID" -sha256 -out "$CSR.new"
  chmod 0644 "$CSR.new"
  mv -f "$CSR.new" "$CSR"
  say "CSR made (CN=$DEVICE_ID): $CSR"
fi

# --- the certificate: signed here, or handed in
check_cert() { # FILE NAME: refuse a certificate for another key, another CN, or another CA
  local file=$1 name=$2 cn ca=$CA_CERT
  # Without --ca-cert, the fleet CA installed before (ca.pem) checks it.
  [ -n "$ca" ] || [ ! -e "$CA" ] || ca=$CA
  openssl x509 -in "$file" -noout 2>/dev/null || die "refused $name: not a PEM certificate"
  [ "$(pubkey_of_cert "$file")" = "$(pubkey_of_key "$KEY")" ] ||
    die "refused $name: its public key is not this device's key ($KEY); have $CSR signed"
  cn=$(cn_of x509 "$file")
  [ "$cn" = "$DEVICE_ID" ] || die "refused $name: its CN is '$cn', this device is '$DEVICE_ID'"
  if [ -n "$ca" ]; then
    openssl verify -CAfile "$ca" -purpose sslclient "$file" >/dev/null 2>"$WORK/verify" ||
      die "refused $name: openssl verify against $ca failed: $(tr '\n' ' ' <"$WORK/verify")"
    say "openssl verify: $name is a client certificate of $ca"
  fi
}
install_file() { # SRC DEST
  install -m 0644 "$1" "$2.new"
  mv -f "$2.new" "$2"
}

if [ -n "$CA_KEY" ]; then
  cat >"$WORK/ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
  openssl x509 -req -in "$CSR" -CA "$CA_CERT" -CAkey "$CA_KEY" -days "$DAYS" -sha256 \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$WORK/ext" -out "$WORK/device.pem" 2>"$WORK/sign" ||
    die "signing failed: $(tr '\n' ' ' <"$WORK/sign")"
  check_cert "$WORK/device.pem" "the signed certificate"
  install_file "$WORK/device.pem" "$PEM"
  say "certificate signed by $CA_CERT ($DAYS days, clientAuth): $PEM"
elif [ -n "$CERT" ]; then
  check_cert "$CERT" "$CERT"
  install_file "$CERT" "$PEM"
  say "certificate installed: $PEM"
fi
if [ -n "$CA_CERT" ]; then
  install_file "$CA_CERT" "$CA"
  say "fleet CA installed: $CA"
fi

if [ -e "$PEM" ]; then
  say "config.yaml: mqtt.url mqtts://…, mqtt.ca $DIR/ca.pem, mqtt.cert $DIR/device.pem, mqtt.key $DIR/device.key"
else
  say "next: have the fleet CA sign $CSR, then: device-identity.sh --cert device.pem --ca-cert ca.pem"
fi
