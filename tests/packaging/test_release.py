"""packaging/release.sh: one command writes dist/emp-worker-<version>-linux-<arch>.tar.gz with the
binary, .env.example, the PM2 file, the systemd units, plugins/ with a README, a README and
SHA256SUMS. Packed here from a stand-in binary (or the built one when there is one)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tarfile
from pathlib import Path

from tests.packaging.procs import ROOT, built_binary
from worker import __version__

CONTENTS = {".env.example", "README.md", "SHA256SUMS", "ecosystem.config.js", "emp-worker", "plugins/README.md",
            "systemd/emp-worker.service", "systemd/emp-worker@.service"}


def _binary(tmp_path: Path) -> Path:
    built = built_binary()
    if built is not None:
        return built
    fake = tmp_path / "emp-worker"  # answers --version as the binary does; that is all release.sh asks
    fake.write_text(f"#!/bin/sh\necho 'emp-worker {__version__}'\n")
    fake.chmod(0o755)
    return fake


def test_release_writes_the_tarball_with_everything_and_checksums(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    env = {**os.environ, "EMP_RELEASE_SKIP_BUILD": "1", "EMP_RELEASE_BINARY": str(_binary(tmp_path)),
           "EMP_RELEASE_DIR": str(out)}
    done = subprocess.run(["bash", str(ROOT / "packaging" / "release.sh")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    name = f"emp-worker-{__version__}-linux-{platform.machine()}"
    tarball = out / f"{name}.tar.gz"
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert (out / f"{name}.tar.gz.sha256").read_text().split() == [digest, tarball.name]

    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = {n.removeprefix(f"{name}/") for n, m in members.items() if m.isfile()}
        assert files == CONTENTS
        assert all(n == name or n.startswith(f"{name}/") for n in members)  # one top directory
        assert members[f"{name}/emp-worker"].mode & 0o111 and members[f"{name}/emp-worker"].uid == 0
        tar.extractall(tmp_path / "x", filter="data")
    home = tmp_path / "x" / name
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=home, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(CONTENTS) - 1, check.stdout
    assert f"emp-worker {__version__}" in (home / "README.md").read_text()
    assert (home / "ecosystem.config.js").read_bytes() == (ROOT / "packaging/pm2/ecosystem.config.js").read_bytes()
    assert (home / ".env.example").read_bytes() == (ROOT / ".env.example").read_bytes()
