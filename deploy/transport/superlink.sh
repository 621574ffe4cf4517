#!/bin/sh
# The network operator's SuperLink with TLS and SuperNode authentication (flwr 1.42).
# Keys: `fedrwe pki init --out /etc/fedrwe/pki --host superlink.example.org` (once).
# One HTTPS port serves the Fleet API (sites) and the Control API (study lead's flwr CLI).
set -eu
PKI=${PKI:-/etc/fedrwe/pki}
exec flower-superlink \
  --ssl-ca-certfile "$PKI/ca.pem" \
  --ssl-certfile "$PKI/superlink.pem" \
  --ssl-keyfile "$PKI/superlink.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "${FLWR_STATE:-/var/lib/fedrwe/superlink.db}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}"
