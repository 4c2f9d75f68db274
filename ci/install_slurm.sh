#!/usr/bin/env bash
# Install SLURM and munge for the SLURM tests (tests/slurm), if this machine can.
# Soft: never fails the build. Without the packages, the SLURM tests skip with a reason.
# The tests start their own throw-away cluster (tests/slurm/cluster.py); nothing is
# configured or started here, and services the packages try to start are not needed.
set -u
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    echo "install_slurm: slurm and munge already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: no apt-get here; SLURM tests will be skipped"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_slurm: not root and no passwordless sudo; SLURM tests will be skipped"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
packages="slurm-wlm munge"
if ! apt-cache policy slurm-wlm 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $SUDO apt-get update -qq || true
fi
# --no-install-recommends keeps it to the daemons, clients and their libraries.
if timeout 600 $SUDO apt-get install -y -qq --no-install-recommends $packages >/tmp/install_slurm.log 2>&1; then
    echo "install_slurm: installed $packages"
else
    echo "install_slurm: could not install $packages (see /tmp/install_slurm.log); SLURM tests will be skipped"
    tail -n 5 /tmp/install_slurm.log 2>/dev/null || true
fi
exit 0
