#!/bin/sh
# Build a minimal Debian bookworm base with Python 3.11 for deploy/Dockerfile, for a
# machine that cannot pull the official python image but reaches a Debian archive:
#
#   deploy/build-base.sh [IMAGE]          # default IMAGE: gradmesh-base:bookworm
#   docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=gradmesh-base:bookworm ...
#
# Needs root, debootstrap and a running Docker engine. DEBIAN_MIRROR names the archive
# (default: the first Debian archive in this machine's apt sources, so the base comes
# from where apt already installs from). The image holds bookworm's python3 (3.11),
# python3-venv (ensurepip) and ca-certificates, nothing of apt's caches or lists.
set -eu

image=${1:-gradmesh-base:bookworm}
suite=bookworm

first_apt_mirror() {
    # deb822 sources ("URIs: ...") first, then one-line ones ("deb [opts] URI suite ...").
    sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v security | head -n 1
    sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
        /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1
}

mirror=${DEBIAN_MIRROR:-$(first_apt_mirror | head -n 1)}
if [ -z "$mirror" ]; then
    echo "build-base.sh: no Debian archive in the apt sources; set DEBIAN_MIRROR" >&2
    exit 2
fi
command -v debootstrap >/dev/null || { echo "build-base.sh: apt-get install debootstrap" >&2; exit 2; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror"

# What apt downloaded and indexed is not part of the base, nor are manuals, translations
# and documentation other than the licences (about 50 MB); dpkg is told to leave them out
# of later installs too.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
cat > "$rootfs"/etc/dpkg/dpkg.cfg.d/gradmesh-slim <<'END'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
END
find "$rootfs"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs"/usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*

version=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
    echo "build-base.sh: $suite has Python $version; deploy/requirements.lock is for 3.11" >&2
    exit 1
fi

tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image"
docker image inspect --format '{{.Id}}  {{.Size}} bytes' "$image"
