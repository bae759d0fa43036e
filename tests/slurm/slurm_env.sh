#!/usr/bin/env bash
# Installs what the Slurm tier needs: a single-node Slurm cluster from Debian's packages (slurmctld, slurmd, the
# client commands) and munge, its authentication. The tests start and stop the daemons themselves in a temporary
# folder; nothing here starts a service or writes a configuration.
#
# Does nothing when the commands are already there. Installing needs root (CI runs as root); anyone else is told
# what to install.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd sbatch squeue scontrol scancel sinfo munged mungekey)

missing=()
for command in "${COMMANDS[@]}"; do
    command -v "$command" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$command" >/dev/null 2>&1 \
        || missing+=("$command")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

log() { printf '[slurm_env] %s\n' "$*" >&2; }

if [[ "$(id -u)" -ne 0 ]]; then
    log "the Slurm tests need ${missing[*]}, which are not installed. Install them as root:"
    log "  apt-get install --no-install-recommends ${PACKAGES[*]}"
    exit 1
fi

install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"; }
log "installing ${PACKAGES[*]}"
# A fresh machine may have no package lists (or stale ones): update only when the install cannot find the packages.
if ! install; then
    log "apt-get install failed; updating the package lists and trying again"
    apt-get update
    install
fi
