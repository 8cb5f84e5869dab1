#!/bin/sh
# Installs the Debian packages MX Guard needs to build and run: pymilter compiles
# against libmilter, so gcc, the Python headers and libmilter-dev must be present.
# Installs only what is missing; needs root for that (prints the command otherwise).
set -eu

packages="gcc libmilter-dev python3-dev python3-venv"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "mx-guard needs these Debian packages:$missing" >&2
    echo "install them as root: apt-get install$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing
