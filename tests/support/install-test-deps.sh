#!/bin/sh
# Installs what the tests talk to: a real redis-server (the tests start their own on
# free ports), Debian's miltertest, and the MTAs of the end-to-end tests.
# Installs only what is missing; needs root for that.
set -eu

# systemd brings systemd-analyze, -sysusers and -tmpfiles for the deploy/ checks;
# nftables and rbldnsd load what `mx-guard traps` exports.
packages="redis-server miltertest openssl systemd nftables rbldnsd"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "the tests need these Debian packages:$missing (apt-get install as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    apt-get install -y -qq --no-install-recommends $missing
fi

here=$(dirname "$0")
if [ -f "$here/install-mtas.sh" ]; then
    sh "$here/install-mtas.sh"
fi
