"""Start-up of the one-file binary: the worker dies with the bootloader that started it.

A PyInstaller one-file executable runs as two processes: the *bootloader* (the PID a supervisor
starts and tracks) unpacks the bundle and starts the Python worker as its child, then waits for
it. The bootloader forwards the signals it gets (SIGTERM, SIGINT...) to the child once
(``bootloader_ignore_signals=False`` in worker.spec), so a supervisor that signals only the PID it
tracks (systemd ``KillMode=mixed``, PM2 ``treekill: false``) reaches the worker. SIGKILL cannot
be forwarded: without more, ``kill -9`` of the bootloader would leave the worker running as an
orphan while the supervisor starts a second one with the same worker id. So the child asks the
kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that the
bootloader did not die before that request (in which case it exits at once).

``enter()`` does this when, and only when, this process is a one-file child: frozen, and its
parent runs the same executable. A ``pip install`` (or a one-dir build) is one process and is
left as it is. Linux only (prctl); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exe(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone, or not ours to read
        return ""


def is_onefile_child(parent: int) -> bool:
    """Frozen by PyInstaller and started by a one-file bootloader (`parent` runs our binary)."""
    if not getattr(sys, "frozen", False) or not sys.platform.startswith("linux"):
        return False
    own = _exe("self")
    return bool(own) and _exe(parent) == own


def die_with_parent(parent: int) -> bool:
    """Ask for SIGKILL when the parent dies; False when prctl is not available. If the parent
    already died (we were re-parented before the request), exit now: nothing would kill us later."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os._exit(1)  # the bootloader is gone: its supervisor has already moved on
    return True


def enter() -> None:
    """Called first thing by the binary's entry point (packaging/entry.py)."""
    parent = os.getppid()  # read once: the checks below are about this process
    if is_onefile_child(parent):
        die_with_parent(parent)
