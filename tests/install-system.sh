#!/bin/sh
# What the tests drive besides Python packages, from Debian's packages, installed with apt when
# missing (sudo unless already root): chromium for the browser tests (never a browser that
# Playwright downloads); podman, runc and mmdebstrap for the container test (tests/podman.py).
set -e
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v podman >/dev/null 2>&1 || missing="$missing podman"
command -v runc >/dev/null 2>&1 || missing="$missing runc"
command -v mmdebstrap >/dev/null 2>&1 || missing="$missing mmdebstrap"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
command -v chromium podman runc mmdebstrap
