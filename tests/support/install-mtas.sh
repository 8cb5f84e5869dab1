#!/bin/sh
# Install everything the end-to-end MTA harness (tests/e2e) needs.
# Idempotent; run as root on Debian 12:   sh tests/support/install-mtas.sh
#
# - Postfix from apt, unconfigured (debconf "No configuration"): the harness
#   runs private instances with their own config/queue directories only.
# - Cyrus SASL (sasl2-bin + modules) for the optional SMTP AUTH test user.
# - Sendmail is NOT installed through apt (sendmail-bin conflicts with postfix):
#   its .debs are downloaded and unpacked into <repo>/.mta/sendmail (git-ignored
#   by a .gitignore written into .mta/), with its shared-library deps and m4
#   installed from apt.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "install-mtas.sh: must run as root" >&2
    exit 1
fi

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MTA_DIR=${MXGUARD_MTA_DIR:-$ROOT/.mta}
SM_DIR=$MTA_DIR/sendmail

export DEBIAN_FRONTEND=noninteractive

PKGS="postfix sasl2-bin libsasl2-modules libsasl2-modules-db m4 procps util-linux
      libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done

updated=no
apt_update() {
    if [ "$updated" = no ]; then
        apt-get update -qq
        updated=yes
    fi
}

if [ -n "$missing" ]; then
    echo "install-mtas.sh: installing:$missing"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt_update
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
else
    echo "install-mtas.sh: apt packages already installed"
fi

# Sendmail, unpacked (not installed) into $SM_DIR.
SM_PKGS="sendmail-bin sendmail-base sendmail-cf"
want=""
if command -v apt-cache >/dev/null; then
    want=$(apt-cache policy sendmail-bin 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$want" ] || [ "$want" = "(none)" ]; then
        apt_update
        want=$(apt-cache policy sendmail-bin | awk '/Candidate:/ {print $2}')
    fi
fi
have=$(cat "$SM_DIR/.version" 2>/dev/null || true)
if [ -x "$SM_DIR/usr/libexec/sendmail/sendmail" ] && [ -f "$SM_DIR/usr/share/sendmail/cf/m4/cf.m4" ] \
        && [ -n "$have" ] && [ "$have" = "$want" ]; then
    echo "install-mtas.sh: sendmail $have already unpacked in $SM_DIR"
else
    echo "install-mtas.sh: unpacking sendmail $want into $SM_DIR"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 0755 "$tmp"
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root $SM_PKGS) || {
        apt_update
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root $SM_PKGS)
    }
    rm -rf "$SM_DIR"
    mkdir -p "$SM_DIR"
    for deb in "$tmp"/*.deb; do
        dpkg-deb -x "$deb" "$SM_DIR"
    done
    echo "$want" > "$SM_DIR/.version"
fi

mkdir -p "$MTA_DIR"
# Keep the unpacked tree out of git without touching the repo's .gitignore.
printf '*\n' > "$MTA_DIR/.gitignore"

for tool in /usr/sbin/postfix /usr/sbin/postconf /usr/sbin/saslpasswd2 /usr/bin/m4 /usr/bin/unshare \
        "$SM_DIR/usr/libexec/sendmail/sendmail"; do
    if [ ! -x "$tool" ]; then
        echo "install-mtas.sh: $tool is missing after install" >&2
        exit 1
    fi
done
echo "install-mtas.sh: done"
