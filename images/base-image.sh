#!/bin/sh
# The images' Python 3.11 base bootstrapped from Debian's archive alone (`make base-image`), for
# machines that reach a Debian mirror and PyPI but no container registry (air-gapped or proxied
# builds). debootstrap's minbase, then python3.11 and its venv module from apt, imported as an image.
#
# Every package is signature-checked: debootstrap checks the suite's Release file against Debian's
# archive keyring (apt package debian-archive-keyring) and, with --force-check-gpg, stops instead of
# warning when it cannot; apt in the chroot checks its own downloads the same way. The security suite
# and the point-release updates are added and applied (apt-get upgrade) before anything is installed.
# The image records in labels which path built it (kftune.base.path=debian-bootstrap, the suite and
# the archive's Release date), so an image built on it can say so in its tag (images/build.sh).
# Usage: images/base-image.sh ENGINE IMAGE_NAME [SUITE] [MIRROR] [KEYRING]   (run as root)
set -eu
engine=$1 name=$2 suite=${3:-bookworm} mirror=${4:-http://deb.debian.org/debian}
keyring=${5:-/usr/share/keyrings/debian-archive-keyring.gpg}
for tool in debootstrap "$engine"; do
  command -v "$tool" >/dev/null || { echo "base-image: $tool not found (apt-get install debootstrap $engine)" >&2; exit 1; }
done
[ -s "$keyring" ] || { echo "base-image: keyring $keyring not found (apt-get install debian-archive-keyring)" >&2; exit 1; }
root=$(mktemp -d "${TMPDIR:-/tmp}/kftune-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
# python3.11-venv cannot be --include'd here (a dependency fails at this stage): apt installs it after.
debootstrap --variant=minbase --keyring="$keyring" --force-check-gpg "$suite" "$root" "$mirror"
# The security archive sits beside the main one on Debian's mirrors (deb.debian.org/debian-security).
security=${SECURITY_MIRROR:-${mirror%/debian}/debian-security}
cat > "$root"/etc/apt/sources.list <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF
chroot "$root" apt-get update
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -y upgrade
# passwd: useradd/groupadd for the images' non-root user.
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  python3.11 python3.11-venv ca-certificates passwd
released=$(sed -n 's/^Date: //p' "$root"/var/lib/apt/lists/*_dists_"${suite}"-security_InRelease | head -n 1)
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
ln -sf python3.11 "$root"/usr/bin/python3
python=$(chroot "$root" python3.11 -c 'import platform; print(platform.python_version())')
echo "base-image: $name: Debian $suite (+security, upgraded; signatures checked with $keyring), Python $python" >&2
tar -C "$root" -c . | "$engine" import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  --change 'LABEL kftune.base.path=debian-bootstrap' \
  --change "LABEL kftune.base.suite=$suite" \
  --change "LABEL kftune.base.python=$python" \
  --change "LABEL kftune.base.security-release=\"$released\"" \
  - "$name"
