#!/bin/sh
# Refreshes the JavaScript the dashboard vendors (src/cycles/dashboard/static/vendor/) from the npm
# registry with `npm pack`: the exact pinned versions below, the files the Evidence page imports
# (Ed25519 verify and SHA-2, untouched, as ES modules) and each package's LICENSE. Nothing is built.
# To move to a new version: change the pin, run this, read the diff, run tests/dashboard.
# Usage: scripts/refresh-vendor.sh   (needs npm; nothing else in the project does)
set -eu
ED25519=3.2.0   # @noble/ed25519, MIT
HASHES=2.4.0    # @noble/hashes, MIT (sha2.js and the three modules it imports)

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/src/cycles/dashboard/static/vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() { # package version dir files...
  pkg=$1 ver=$2 dir=$3; shift 3
  (cd "$tmp" && npm pack --silent "$pkg@$ver" >/dev/null)
  mkdir -p "$tmp/$dir" && tar xzf "$tmp"/*"$dir"-"$ver".tgz -C "$tmp/$dir"
  rm -rf "${dest:?}/$dir" && mkdir -p "$dest/$dir"
  for f in LICENSE "$@"; do cp "$tmp/$dir/package/$f" "$dest/$dir/$f"; done
  printf '%s@%s\n' "$pkg" "$ver" > "$dest/$dir/VERSION"
}
fetch @noble/ed25519 "$ED25519" noble-ed25519 index.js
fetch @noble/hashes "$HASHES" noble-hashes sha2.js _md.js _u64.js utils.js
# ed25519's index.js imports nothing; hashes' modules import each other by relative path.
echo "vendored @noble/ed25519@$ED25519 and @noble/hashes@$HASHES into $dest"
