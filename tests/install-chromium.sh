#!/bin/sh
# The browser tests drive Debian's chromium (never a browser downloaded by Playwright).
# Installs it with apt when missing; uses sudo unless already root.
set -e
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium
