#!/usr/bin/env bash
# .ci/apt-install.sh PACKAGE...: install Debian packages (sudo unless root), all output on stderr.
set -euo pipefail
SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo "sudo")
{
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
} >&2
