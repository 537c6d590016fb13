"""Every Lua script emp-worker runs in Redis, each one atomic.

Conventions, shared by all scripts:

* ``ARGV[1]`` is the key prefix (``Keys.prefix``); every key is that prefix plus a name from
  ``worker/keys.py``, substituted here for the ``@NAME@`` tokens. A claim picks its job *inside*
  the script, so per-job keys cannot be declared in ``KEYS`` ahead of time; the scripts therefore
  take no ``KEYS`` at all and derive every key from the prefix. (emp-job-queue's layout has no hash
  tags, so it cannot span Redis Cluster slots in any case; a Cluster deployment runs one shard.)
* Time comes from the server (``TIME``), so leases, ages and timestamps share one clock however
  skewed the workers' clocks are. Timestamps are written ISO-8601 UTC with milliseconds.
* Scripts are effect-replicated (the default from Redis 5), so ``TIME`` before writes is safe on
  Redis 6.2+, 7.x and Valkey.
* A fenced call (progress, complete, fail, hand-back) passes the worker id and attempt number it
  claimed with; the script refuses it with ``{0, reason}`` when either no longer matches.
* Fixed configuration (lease, stream and retention limits...) is not spread over positional ARGV:
  a script that needs any takes one JSON options argument, last, whose fields are named as in
  ``worker.queue.QueueConfig`` (plus ``max_per_beat``); its header lists the fields it reads.

Pending-job index. ``jobs:pending`` stays the emp-job-queue view (their API and monitor read it,
their API writes it). Claims are served from ``emp:q:{class}`` sorted sets, one per
(service, requirements, customer) class: score ``-effective_priority``, member
``{effective_ms:013}:{seq:012}:{job id}``, so ``ZRANGE 0 0`` yields the highest priority and,
within it, the oldest job, exactly (no float buckets). A claim inspects one head per class instead
of scanning jobs, and only the classes of the services its worker serves (``emp:classes:{service}``;
``emp:classes`` lists them all). Jobs written by the emp-job-queue API are indexed on
``job_submitted`` (the claim's hint) and by reconcile steps: a claim's while ``jobs:pending`` and
``emp:indexed`` differ in size, the reaper's once per reap period.

Wake-up. An idle worker waits on its services' wake lists (``emp:wakeup:{service}``) with BLPOP;
each job made claimable pushes one token ``"{hops}:{job id}"`` (lib/wake.lua), which Redis hands
to one waiting worker; a claim that leaves the hinted job pending passes the token on. A job
costs one wake-up, however many workers are idle.

Sources. Each script is a file ``worker/lua/{name}.lua``; shared helpers are
``worker/lua/lib/{helper}.lua``. A file's header comment says what it does (a script's also its
KEYS, ARGV and return value) and, on a ``-- requires: a b c`` line, which helpers it uses; a helper
may require others. A script's rendered source is its helpers, each after the helpers it requires,
then the script itself, with every ``@NAME@`` replaced by its value from ``worker/keys.py``. The
files are package data (pyproject.toml, worker.spec), read with importlib.resources.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

from worker import keys

SCRIPTS = ("submit", "claim", "start", "progress", "complete", "fail", "hand_back", "heartbeat", "reconcile", "cancel",
           "set_loaded", "match_probe", "wake")

_REQUIRES = re.compile(r"^-- requires:(.*)$", re.MULTILINE)


def lua_dir() -> Traversable:
    """worker/lua, wherever the package lives (source tree, wheel, PyInstaller bundle)."""
    return resources.files("worker") / "lua"


def _read(path: Traversable) -> str:
    return path.read_text(encoding="utf-8")


def requires(source: str) -> list[str]:
    """The helpers a Lua file names on its ``-- requires:`` header line (none when it has none)."""
    found = _REQUIRES.search(source)
    return found.group(1).split() if found else []


def _helpers(names: list[str], lib: Traversable, order: list[str], visiting: tuple[str, ...] = ()) -> None:
    """Append to ``order`` each helper in ``names`` after the helpers it requires (depth first)."""
    for name in names:
        if name in order:
            continue
        if name in visiting:
            raise RuntimeError(f"Lua helpers require each other in a cycle: {' -> '.join((*visiting, name))}")
        path = lib / f"{name}.lua"
        if not path.is_file():
            raise RuntimeError(f"Lua helper {name!r} is required but worker/lua/lib/{name}.lua does not exist")
        _helpers(requires(_read(path)), lib, order, (*visiting, name))
        order.append(name)


def _render(*parts: str) -> str:
    source = "\n".join(parts)
    for name, value in keys.LUA_NAMES.items():
        source = source.replace(f"@{name}@", value)
    if "@" in source.replace("'@'", ""):
        unknown = source[source.index("@") : source.index("@") + 40]
        raise RuntimeError(f"unsubstituted name in Lua source near {unknown!r}")
    return source


def render(name: str) -> str:
    """The source Redis runs for script ``name``: its helpers in dependency order, then the script."""
    root = lua_dir()
    script = _read(root / f"{name}.lua")
    order: list[str] = []
    _helpers(requires(script), root / "lib", order)
    return _render(*(_read(root / "lib" / f"{helper}.lua") for helper in order), script)


ALL: dict[str, str] = {name: render(name) for name in SCRIPTS}
