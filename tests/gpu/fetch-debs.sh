#!/bin/sh
# tests/gpu/fetch-debs.sh - run HERE (a Debian/Ubuntu machine with apt and
# network) before a GPU session: downloads the -dev packages moed builds
# against, and their libraries, into .debs/ (git-ignored), so that
# tests/gpu/run.sh can unpack them on the GPU machine, which has no network
# and may lack them. Carry the folder with the call: run(carry=[".debs"]).
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.debs/' .git/info/exclude 2>/dev/null || echo '/.debs/' >> .git/info/exclude
mkdir -p .debs
cd .debs
# pkg-config module -> packages (headers + the shared libraries they link)
apt-get download pkgconf pkgconf-bin libpkgconf3 \
    check libsubunit-dev libsubunit0 \
    libmicrohttpd-dev libmicrohttpd12 \
    libuv1-dev libuv1 \
    libcjson-dev libcjson1 \
    libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 \
    libsystemd-dev \
    libpowercap-dev libpowercap0 \
    libicu-dev "$(apt-cache depends libicu-dev | awk '/Depends: libicu[0-9]/ {print $2; exit}')"
du -sh .
