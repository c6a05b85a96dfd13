#!/bin/sh
# The managed Docker plugin's entry point: on first start make the node (a new cluster, or a
# join with SHOAL_JOIN), then run the daemon, mounted inside the propagated mount so that
# Docker on the host sees the volumes.
set -eu
DATA=/var/lib/shoal
if [ ! -e "$DATA/shoal.json" ]; then
  chmod 700 "$DATA"
  if [ -n "${SHOAL_JOIN:-}" ]; then
    [ -n "${SHOAL_PEER:-}" ] && [ -n "${SHOAL_LISTEN:-}" ] || {
      echo "shoal plugin: SHOAL_JOIN needs SHOAL_PEER (a node's address) and SHOAL_LISTEN (this host's): docker plugin set PLUGIN SHOAL_PEER=IP:PORT SHOAL_LISTEN=IP:PORT" >&2
      exit 1
    }
    /bin/shoal join --data "$DATA" --token "$SHOAL_JOIN" --peer "$SHOAL_PEER" --listen "$SHOAL_LISTEN"
  elif [ -n "${SHOAL_LISTEN:-}" ]; then
    /bin/shoal init --data "$DATA" --listen "$SHOAL_LISTEN"
  else
    /bin/shoal init --data "$DATA"
  fi
fi
# shellcheck disable=SC2086 # SHOAL_ARGS is a list of arguments
exec /bin/shoal daemon --data "$DATA" --mount /mnt/shoal/fs \
  --plugin-socket /run/docker/plugins/shoal.sock ${SHOAL_ARGS:-}
