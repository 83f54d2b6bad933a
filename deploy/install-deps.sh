#!/bin/sh
# Installs the Debian packages moed builds and tests against, when missing.
# As root it runs apt-get itself; otherwise it prints the exact command and
# fails, so nothing is installed behind the user's back.
set -eu

# pkg-config module -> Debian package
MODULES="libmicrohttpd:libmicrohttpd-dev libuv:libuv1-dev libcjson:libcjson-dev check:check libpcre2-8:libpcre2-dev libsystemd:libsystemd-dev icu-uc:libicu-dev powercap:libpowercap-dev"

missing=""
command -v pkg-config >/dev/null 2>&1 || missing="pkg-config"
command -v cc >/dev/null 2>&1 || missing="$missing build-essential"
for pair in $MODULES; do
    mod=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists "$mod"; then
        missing="$missing $pkg"
    fi
done
if [ "${WITH_PYTHON:-0}" = 1 ] && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi
if [ "${WITH_FUZZ:-0}" = 1 ] && ! command -v clang >/dev/null 2>&1; then
    missing="$missing clang libclang-rt-dev"
fi

missing=$(echo $missing)
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "moed: installing build dependencies: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
    exit 0
fi
echo "moed: missing build dependencies. Install them with:" >&2
echo "    sudo apt-get install -y $missing" >&2
exit 1
