#!/bin/sh
# A site's SuperNode: checks the SuperLink's certificate against the federation's CA and
# signs in with the site's own key (`fedrwe pki site-key --out /etc/fedrwe/keys --site st_marys`).
# It connects only after the operator has registered /etc/fedrwe/keys/st_marys.pub.
set -eu
SITE=${SITE:-st_marys}
exec flower-supernode \
  --superlink "${SUPERLINK:-superlink.example.org:8000}" \
  --root-certificates /etc/fedrwe/ca.pem \
  --auth-supernode-private-key "/etc/fedrwe/keys/$SITE.key" \
  --host 127.0.0.1 --port 9094 \
  --node-config "site-id='$SITE' service-url='http://127.0.0.1:8801'"
