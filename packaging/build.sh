#!/usr/bin/env bash
# Release build of the one-file binary: dist/emp-worker (+ dist/emp-worker.sha256).
#
#   bash packaging/build.sh            # from any directory
#   PYTHON=python3.12 bash packaging/build.sh
#   EMP_BUILD_KEEP_VENV=1 bash packaging/build.sh   # reuse build/venv from the last run (faster)
#   EMP_BUILD_VENV=.venv bash packaging/build.sh     # use this venv as it is (CI: it has .[dev,build])
#
# Steps: a throwaway venv under build/venv, pip install '.[build,s3,azure]' (the package, its runtime
# dependencies, the cloud output stores' libraries and PyInstaller), pyinstaller worker.spec, then a
# smoke test of the binary.
# Build on the oldest glibc you deploy to: the binary runs on that glibc and newer ones only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${EMP_BUILD_VENV:-build/venv}"
BIN="dist/emp-worker"
started=$(date +%s)

log() { printf '\n==> %s\n' "$*"; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "build.sh: $PYTHON is older than Python 3.11" >&2; exit 1; }

if [[ -n "${EMP_BUILD_VENV:-}" ]]; then
    [[ -x "$VENV/bin/pyinstaller" ]] || { echo "build.sh: $VENV has no pyinstaller (pip install -e '.[build]')" >&2; exit 1; }
    log "using $VENV as it is"
else
    if [[ "${EMP_BUILD_KEEP_VENV:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV with $("$PYTHON" --version)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    log "installing .[build,s3,azure]"
    # setuptools stages the wheel in build/lib; clear it so files deleted from the tree cannot linger.
    rm -rf build/lib build/bdist.*
    "$VENV/bin/python" -m pip install --quiet --upgrade '.[build,s3,azure]'
fi

log "pyinstaller worker.spec"
"$VENV/bin/pyinstaller" --clean --noconfirm --log-level WARN \
    --workpath build/pyinstaller --distpath dist worker.spec

log "smoke test"
test -x "$BIN"
version="$("$BIN" --version)"
echo "$BIN --version: $version"
"$BIN" --help >/dev/null
echo "$BIN --help: ok"

log "result"
(cd dist && sha256sum emp-worker > emp-worker.sha256)
size=$(stat -c %s "$BIN")
printf '%s  %s bytes (%s)  built in %ss\n' "$BIN" "$size" "$(numfmt --to=iec "$size")" "$(( $(date +%s) - started ))"
cat dist/emp-worker.sha256
