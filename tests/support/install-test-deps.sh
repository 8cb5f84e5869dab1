#!/bin/sh
# Installs what the tests talk to: a real redis-server (the tests start their own on
# free ports), Debian's miltertest, and the MTAs of the end-to-end tests.
# Installs only what is missing; needs root for that.
set -eu

# systemd brings systemd-analyze, -sysusers and -tmpfiles for the deploy/ checks;
# nftables and rbldnsd load what `mx-guard traps` exports; groff-base renders the
# man pages (groff -man -ww -z).
packages="redis-server miltertest openssl systemd nftables rbldnsd groff-base"
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

# promtool checks and unit-tests deploy/prometheus/alerts.yml. Debian ships it in the
# prometheus package, whose install would also start a Prometheus server: only the
# package is downloaded, and promtool alone unpacked into <repo>/.mta/prometheus.
root=$(cd "$here/../.." && pwd)
tools=${MXGUARD_MTA_DIR:-$root/.mta}/prometheus
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$tools/usr/bin/promtool" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "the tests need promtool (Debian package prometheus): run this as root" >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root prometheus) || {
        apt-get update -qq
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root prometheus)
    }
    mkdir -p "$tools"
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tools" ./usr/bin/promtool
    rm -rf "$tmp"
    "$tools/usr/bin/promtool" --version >/dev/null
fi
if [ -f "$here/install-mtas.sh" ]; then
    sh "$here/install-mtas.sh"
fi
