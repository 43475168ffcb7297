#!/bin/sh
# The images' Python 3.11 base bootstrapped from Debian's archive alone (`make base-image`), for
# machines that reach a Debian mirror and PyPI but no container registry (air-gapped or proxied
# builds). debootstrap's minbase, then python3.11 and its venv module from apt, imported as an image.
# Usage: images/base-image.sh ENGINE IMAGE_NAME [SUITE] [MIRROR]   (run as root: debootstrap and chroot)
set -eu
engine=$1 name=$2 suite=${3:-bookworm} mirror=${4:-http://deb.debian.org/debian}
for tool in debootstrap "$engine"; do
  command -v "$tool" >/dev/null || { echo "base-image: $tool not found (apt-get install debootstrap $engine)" >&2; exit 1; }
done
root=$(mktemp -d "${TMPDIR:-/tmp}/kftune-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
# python3.11-venv cannot be --include'd here (a dependency fails at this stage): apt installs it after.
debootstrap --variant=minbase "$suite" "$root" "$mirror"
# passwd: useradd/groupadd for the images' non-root user.
chroot "$root" apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates passwd
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
ln -sf python3.11 "$root"/usr/bin/python3
tar -C "$root" -c . | "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$name"
