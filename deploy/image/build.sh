#!/usr/bin/env bash
# Build the harmony-agent container image from Debian packages and PyPI wheels only: no base
# image is pulled from any registry (none can be reached here). Used by `make image`.
#
#   build.sh base    Debian bookworm root file system (debootstrap, minbase + python3) as a
#                    tarball in $HARMONY_IMAGE_CACHE, imported into podman as the base image.
#                    Cached: a second run only re-imports (or reuses) it.
#   build.sh base-tarball   print where the cached base tarball is (or would be)
#   build.sh image   base, then the project's wheel (python -m build) and every dependency
#                    as wheels (pip download, binary only), then `podman build` of
#                    Containerfile with no network: pip installs from those wheels only.
#
# Environment: HARMONY_IMAGE_CACHE (default /var/cache/harmony-image), HARMONY_DEBIAN_MIRROR
# (default: the Debian mirror configured for apt on this machine), IMAGE (default
# localhost/harmony-agent:<version>), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${HARMONY_IMAGE_CACHE:-/var/cache/harmony-image}
PYTHON=${PYTHON:-.venv/bin/python}
SUITE=bookworm
# Everything the image needs from Debian; python3-venv brings ensurepip (pip for the venv).
PACKAGES=python3,python3-venv,ca-certificates,tini
BASE_RECIPE=2   # bump when the way the root file system is made changes
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)

log() { printf 'image: %s\n' "$*" >&2; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { log "$tool not found (apt-get install $tool)"; exit 1; }
  done
}

debian_mirror() {
  if [ -n "${HARMONY_DEBIAN_MIRROR:-}" ]; then echo "$HARMONY_DEBIAN_MIRROR"; return; fi
  # deb822 (URIs: ...) first, then one-line format (deb URL suite ...); the main archive,
  # not the security one.
  local url
  url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}')
  if [ -z "$url" ]; then
    url=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}')
  fi
  echo "${url:-http://deb.debian.org/debian}"
}

base_tag() {
  local key
  key=$(printf '%s\n' "$SUITE" "$(debian_mirror)" "$PACKAGES" "$BASE_RECIPE" | sha256sum | cut -c1-12)
  echo "localhost/harmony-agent-base:$SUITE-$key"
}

build_base() {
  need podman debootstrap tar
  local tag tarball mirror
  tag=$(base_tag)
  tarball="$CACHE/${tag##*:}.tar"
  mirror=$(debian_mirror)
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9   # one builder at a time per cache
  if [ ! -s "$tarball" ]; then
    local root
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log "debootstrap $SUITE from $mirror (cold build of the base root file system)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" \
      >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # What a container never needs: package caches, lists, docs, man pages.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
           "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
           "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
    tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    trap - EXIT
  else
    log "base root file system cached: $tarball"
  fi
  if ! "${PODMAN[@]}" image exists "$tag"; then
    log "importing $tarball as $tag"
    "${PODMAN[@]}" import --quiet \
      --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
      "$tarball" "$tag" >/dev/null
  fi
  echo "$tag"
}

build_image() {
  need podman
  local base version context image
  base=$(build_base)
  version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
  image=${IMAGE:-localhost/harmony-agent:$version}
  context=build/image
  rm -rf "$context" && mkdir -p "$context/wheels"
  log "building the wheel (python -m build)"
  "$PYTHON" -m build --wheel --outdir "$context/wheels" . >"$context/build.log" 2>&1 \
    || { tail -20 "$context/build.log" >&2; exit 1; }
  log "collecting dependency wheels (binary only)"
  "$PYTHON" -m pip download --only-binary=:all: --dest "$context/wheels" \
    "$(ls "$context"/wheels/harmony_agent-*.whl)[embedded]" >"$context/pip.log" 2>&1 \
    || { tail -20 "$context/pip.log" >&2; exit 1; }
  local previous
  previous=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  log "podman build $image from $base"
  "${PODMAN[@]}" build --quiet --network none --pull=never \
    --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    -f Containerfile -t "$image" "$context" >/dev/null
  if [ -n "$previous" ] && [ "$previous" != "$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image")" ]; then
    "${PODMAN[@]}" rmi "$previous" >/dev/null 2>&1 || true   # still used by a container: keep
  fi
  echo "$image"
}

base_tarball() { local tag; tag=$(base_tag); echo "$CACHE/${tag##*:}.tar"; }

case "${1:-image}" in
  base) build_base ;;
  base-tarball) base_tarball ;;
  base-tag) base_tag ;;
  image) build_image ;;
  mirror) debian_mirror ;;
  *) echo "usage: $0 base|image|base-tarball|base-tag|mirror" >&2; exit 2 ;;
esac
