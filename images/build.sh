#!/usr/bin/env bash
# `make images` and `make base-image`: build the project's images with docker, podman or buildah,
# whichever works here, every pin from images/images.env. Built for machines that reach only PyPI
# and a Debian mirror (air-gapped or proxied): the Python base falls back to one bootstrapped from
# Debian's archive (images/base-image.sh) when the upstream one cannot be pulled, and the proxy's CA
# bundle and a local wheelhouse reach the build as a secret and a build context, never as a layer.
#
# Each project image is tagged with the commit it was built from and the base path under it
# (REPO:<commit>[-dirty]-upstream or -debian-<suite>, the same in its labels), never reusing a tag, and
# the refs it built go to build/images.env (with each image's digest as built); `push` pushes them and
# records the registry's digests there (REPO:TAG@sha256:...). components/images.py reads that file, so
# a pipeline compiled after `make images` names those tags, and after `make push-images` pins digests.
#
# Usage: images/build.sh [base|cpu|trainer|push]...   (default: cpu trainer)
# Environment: ENGINE (docker|podman|buildah; default: the first that works), BASE (auto: upstream
# when it can be pulled, else Debian; upstream; debian), CA_BUNDLE (default: the system bundle),
# WHEELHOUSE (a folder of wheels; default: pip's find-links, if any).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. images/images.env

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  for e in docker podman; do
    # a docker CLI without a daemon is common: `info` tells
    if command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1; then engine=$e; break; fi
  done
fi
if [ -z "$engine" ] && command -v buildah >/dev/null 2>&1; then engine=buildah; fi
if [ -z "$engine" ]; then
  echo "images: no working container engine (docker or podman with a running daemon, or buildah)" >&2; exit 1
fi

image_exists() {
  if [ "$engine" = buildah ]; then buildah inspect --type image "$1" >/dev/null 2>&1
  else "$engine" image inspect "$1" >/dev/null 2>&1; fi
}

bootstrap_base() {
  image_exists "$PYTHON_BOOTSTRAP_IMAGE" && return 0
  local import_engine=$engine
  [ "$engine" = buildah ] && import_engine=podman  # buildah has no import: podman shares its storage
  echo "images: bootstrapping $PYTHON_BOOTSTRAP_IMAGE from $DEBIAN_MIRROR ($DEBIAN_SUITE)" >&2
  images/base-image.sh "$import_engine" "$PYTHON_BOOTSTRAP_IMAGE" "$DEBIAN_SUITE" "$DEBIAN_MIRROR"
}

python_base() {
  case "${BASE:-auto}" in
    upstream) echo "$PYTHON_BASE_IMAGE" ;;
    debian) bootstrap_base >&2; echo "$PYTHON_BOOTSTRAP_IMAGE" ;;
    auto)
      if image_exists "$PYTHON_BASE_IMAGE" || timeout 120 "$engine" pull "$PYTHON_BASE_IMAGE" >&2; then
        echo "$PYTHON_BASE_IMAGE"
      else
        echo "images: $PYTHON_BASE_IMAGE cannot be pulled; using the Debian-bootstrapped base" >&2
        bootstrap_base >&2; echo "$PYTHON_BOOTSTRAP_IMAGE"
      fi ;;
    *) echo "images: BASE=${BASE} (expected auto, upstream or debian)" >&2; exit 2 ;;
  esac
}

ca_bundle=${CA_BUNDLE:-}
if [ -z "$ca_bundle" ]; then
  for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [ -f "$f" ]; then ca_bundle=$f; break; fi
  done
fi
[ -f "$ca_bundle" ] || { echo "images: no CA bundle found; set CA_BUNDLE=FILE (PEM)" >&2; exit 1; }
wheelhouse=${WHEELHOUSE-$(python3 -m pip config get global.find-links 2>/dev/null | awk '{print $1}' || true)}
if [ -z "$wheelhouse" ] || [ ! -d "$wheelhouse" ]; then wheelhouse=build/empty-wheelhouse; mkdir -p "$wheelhouse"; fi

BUILT=build/images.env
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo nogit)
# the build context's files (.dockerignore's allow-list) differ from the commit: say so in the tag
if [ -n "$(git status --porcelain -- pyproject.toml README.md kftune components pipelines images 2>/dev/null)" ]; then
  commit=$commit-dirty
fi

base_path() {  # the base under an image, as its tag and labels say it
  if [ "$1" = "$PYTHON_BOOTSTRAP_IMAGE" ]; then echo "debian-$DEBIAN_SUITE"; else echo upstream; fi
}

record() {  # record KEY VALUE [COMMENT]: set KEY in build/images.env, keeping the other keys
  mkdir -p build
  touch "$BUILT"
  { grep -v -e "^$1=" -e "^# $1 " "$BUILT" || true; [ -z "${3:-}" ] || echo "# $1 $3"; echo "$1=$2"; } > "$BUILT.tmp"
  mv "$BUILT.tmp" "$BUILT"
}

build() {  # build NAME DOCKERFILE KEY
  local dockerfile=$2 key=$3 args=() started path tag digest
  path=$(base_path "$PY_BASE")
  tag="${!key%:*}:$commit-$path"
  for a in $(sed -n 's/^ARG \([A-Z_][A-Z0-9_]*\).*/\1/p' "$dockerfile" | sort -u); do
    if [ "$a" = PYTHON_BASE_IMAGE ]; then args+=(--build-arg "$a=$PY_BASE"); else args+=(--build-arg "$a=${!a}"); fi
  done
  started=$(date +%s)
  local format=(); [ "$engine" = docker ] || format=(--format docker)  # OCI format drops SHELL, HEALTHCHECK
  (set -x; "$engine" build "${format[@]}" -f "$dockerfile" "${args[@]}" --secret "id=ca,src=$ca_bundle" \
     --build-context "wheelhouse=$wheelhouse" --label "kftune.commit=$commit" --label "kftune.base=$PY_BASE" \
     --label "kftune.base.path=$path" -t "$tag" .)
  if [ "$engine" = docker ]; then digest=$(docker image inspect --format '{{.Id}}' "$tag")
  else digest=$(podman image inspect --format '{{.Digest}}' "$tag"); fi
  record "$key" "$tag" "built $(date -u +%FT%TZ) from $commit on $PY_BASE; digest as built $digest (a registry's comes from push)"
  echo "images: built $tag ($1) in $(( $(date +%s) - started ))s; $(image_size "$tag"); recorded in $BUILT" >&2
}

image_size() {
  if [ "$engine" = buildah ]; then echo "size $(buildah images --format '{{.Size}}' "$1")"
  else echo "size $("$engine" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}')"; fi
}

push() {  # push KEY: the recorded tag to its registry, then pin it by the digest the registry holds
  local ref
  ref=$(sed -n "s/^$1=//p" "$BUILT" 2>/dev/null)
  [ -n "$ref" ] || { echo "images: no $1 in $BUILT; run make images first" >&2; exit 1; }
  ref=${ref%@*}
  if [ "$engine" = docker ]; then
    docker push "$ref" >&2
    record "$1" "$(docker image inspect --format '{{index .RepoDigests 0}}' "$ref" | sed "s#^[^@]*#$ref#")" "pushed $(date -u +%FT%TZ)"
  else
    "$engine" push --digestfile build/.digest "$ref" >&2
    record "$1" "$ref@$(cat build/.digest)" "pushed $(date -u +%FT%TZ)"
    rm -f build/.digest
  fi
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu trainer)
for t in "${targets[@]}"; do
  case "$t" in
    base) BASE=debian python_base >/dev/null ;;
    cpu) PY_BASE=${PY_BASE:-$(python_base)}; build cpu images/Dockerfile.cpu CPU_IMAGE ;;
    trainer) PY_BASE=${PY_BASE:-$(python_base)}; build trainer images/Dockerfile.trainer TRAINER_IMAGE ;;
    push) push CPU_IMAGE; push TRAINER_IMAGE ;;
    *) echo "images: unknown target $t (base, cpu, trainer or push)" >&2; exit 2 ;;
  esac
done
