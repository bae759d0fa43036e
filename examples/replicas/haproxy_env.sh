#!/usr/bin/env bash
# Installs Debian's haproxy when it is missing (CI runs as root on a fresh machine); anyone else is told the command.
set -euo pipefail
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] && exit 0
if [[ "$(id -u)" -ne 0 ]]; then
    echo "[haproxy_env] the replicas example and its test need haproxy; as root: apt-get install haproxy" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists: update only when the install cannot find the package.
apt-get install -y --no-install-recommends haproxy || { apt-get update && apt-get install -y --no-install-recommends haproxy; }
