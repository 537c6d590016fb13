#!/usr/bin/env bash
# One command for a release: dist/emp-worker-<version>-linux-<arch>.tar.gz (+ .sha256 beside it).
#
#   bash packaging/release.sh                      # builds the binary first (packaging/build.sh)
#   EMP_RELEASE_SKIP_BUILD=1 bash packaging/release.sh   # package the dist/emp-worker already built
#   EMP_BUILD_VENV=.venv bash packaging/release.sh       # build with this venv as it is (CI)
#   EMP_RELEASE_BINARY=path EMP_RELEASE_DIR=dir ...      # pack that binary, write into dir (tests)
#
# The tarball holds one directory, emp-worker-<version>-linux-<arch>/:
#   emp-worker                 the one-file binary
#   .env.example               every setting, commented (copy to .env and edit)
#   ecosystem.config.js        PM2 (pm2 start ecosystem.config.js)
#   systemd/                   emp-worker.service (one agent) and emp-worker@.service (one per GPU)
#   plugins/README.md          drop connector plugins (.py files, packages) here
#   README.md                  download, extract, edit .env, run
#   SHA256SUMS                 of the files above (sha256sum -c SHA256SUMS)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${EMP_RELEASE_BINARY:-dist/emp-worker}"
OUT="${EMP_RELEASE_DIR:-dist}"

if [[ "${EMP_RELEASE_SKIP_BUILD:-0}" != 1 ]]; then
    bash packaging/build.sh
fi
test -x "$BIN" || { echo "release.sh: $BIN is missing; run packaging/build.sh" >&2; exit 1; }

version="$(env -i "$BIN" --version | awk '{print $2}')"
[[ -n "$version" ]] || { echo "release.sh: $BIN --version printed no version" >&2; exit 1; }
arch="$(uname -m)"
name="emp-worker-${version}-linux-${arch}"
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
stage="$staging/$name"
mkdir -p "$stage/systemd" "$stage/plugins" "$OUT"

install -m 0755 "$BIN" "$stage/emp-worker"
install -m 0644 .env.example "$stage/.env.example"
install -m 0644 packaging/pm2/ecosystem.config.js "$stage/ecosystem.config.js"
install -m 0644 packaging/systemd/emp-worker.service packaging/systemd/emp-worker@.service "$stage/systemd/"
install -m 0644 packaging/release/plugins-README.md "$stage/plugins/README.md"
sed "s/@VERSION@/$version/g; s/@NAME@/$name/g" packaging/release/README.md > "$stage/README.md"
chmod 0644 "$stage/README.md"
(cd "$stage" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)

# Reproducible: sorted names, no owners, one mtime (the last commit's, or SOURCE_DATE_EPOCH).
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
tarball="$OUT/$name.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$staging" -cf - "$name" \
    | gzip -n -9 > "$tarball"
(cd "$OUT" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")

size=$(stat -c %s "$tarball")
printf '%s  %s bytes (%s)\n' "$tarball" "$size" "$(numfmt --to=iec "$size")"
cat "$OUT/$name.tar.gz.sha256"
