#!/bin/sh
# The operator registers a site's public key (sent by the site; never its private key).
# Usage: register_site.sh keys/st_marys.pub st_marys
# Uses the `fedrwe` connection of flwr-config.toml (FLWR_HOME=/etc/fedrwe/flwr).
set -eu
FLWR_HOME=${FLWR_HOME:-/etc/fedrwe/flwr} exec flwr supernode register "$1" fedrwe --name "$2" --format json
