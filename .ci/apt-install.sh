#!/usr/bin/env bash
# .ci/apt-install.sh PACKAGE...: install Debian packages (sudo unless root), all output on stderr.
# The package lists are refreshed once per CI run: .ci/run exports OBLITERATUS_APT_STAMP, a file that
# exists once an update has been done (PostgreSQL and Chromium are installed by separate calls).
set -euo pipefail
SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo "sudo")
{
    if [[ -z "${OBLITERATUS_APT_STAMP:-}" || ! -e "$OBLITERATUS_APT_STAMP" ]]; then
        $SUDO apt-get update -qq
        if [[ -n "${OBLITERATUS_APT_STAMP:-}" ]]; then touch "$OBLITERATUS_APT_STAMP"; fi
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
} >&2
