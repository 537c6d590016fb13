"""Lua lint: every script Redis runs compiles under Lua 5.1 (the Lua inside Redis) and reads or
writes no global but the ones Redis provides; the sources in worker/lua are documented and every
helper is used.

The global check reads the Lua 5.1 bytecode of the compiled chunk (nothing is executed: the
scripts need Redis). In Lua 5.1 every access to a name that is not a local or an upvalue compiles
to GETGLOBAL or SETGLOBAL with the name as a constant, so the check sees exactly what Redis would
refuse (a global write: "Script attempted to create global variable") or read as nil (a typo, a
helper a script forgot to require).
"""

from __future__ import annotations

import importlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from worker import scripts

# What Redis's Lua 5.1 environment provides that these scripts may use. (os is not listed: no
# script uses it; add it here when one does.)
ALLOWED_GLOBALS = frozenset({
    "redis", "cjson", "cmsgpack", "bit", "struct", "KEYS", "ARGV",
    "string", "table", "math", "tonumber", "tostring", "type", "pairs", "ipairs", "next", "select",
    "unpack", "error", "pcall", "assert", "setmetatable", "getmetatable", "rawget", "rawset",
})

OP_GETGLOBAL, OP_SETGLOBAL = 5, 7  # Lua 5.1's lopcodes.h

_COMPILE = """
function(source)
  local chunk, err = (loadstring or load)(source, '=script')
  if not chunk then return false, err end
  return true, string.dump(chunk)
end
"""


@cache
def _lua() -> tuple[Any, bool]:
    """(a Lua runtime, whether it is Lua 5.1); skips when lupa is not installed."""
    lupa = pytest.importorskip("lupa", reason="lupa (the dev extra) is not installed: no Lua to compile with")
    try:
        runtime_class = importlib.import_module("lupa.lua51").LuaRuntime
    except ImportError:
        runtime_class = lupa.LuaRuntime  # a build without the bundled Lua 5.1
    runtime = runtime_class(encoding=None)
    return runtime, runtime.eval("_VERSION") == b"Lua 5.1"


def compile_lua(source: str) -> bytes:
    """The chunk's bytecode (string.dump); AssertionError with Lua's message on a syntax error."""
    runtime, _ = _lua()
    ok, out = runtime.eval(_COMPILE)(source.encode())
    assert ok, f"does not compile: {out.decode()}"
    return bytes(out)


@dataclass(frozen=True)
class GlobalUse:
    name: str
    write: bool
    line: int


class _Reader:
    """Lua 5.1 bytecode (ldump.c), with the sizes its header declares."""

    def __init__(self, data: bytes) -> None:
        if data[:5] != b"\x1bLuaQ" or data[5] != 0:
            raise ValueError("not official Lua 5.1 bytecode")
        endian = "<" if data[6] == 1 else ">"
        int_size, self.size_t, instr_size, self.num_size = data[7], data[8], data[9], data[10]
        self.int_fmt = endian + {4: "i", 8: "q"}[int_size]
        self.size_t_fmt = endian + {4: "I", 8: "Q"}[self.size_t]
        self.instr_fmt = endian + {4: "I"}[instr_size]
        self.data, self.pos = data, 12

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def int(self) -> int:
        return self.unpack(self.int_fmt)

    def string(self) -> bytes | None:
        n = self.unpack(self.size_t_fmt)
        return self.take(n)[:-1] if n else None  # stored with its terminating NUL

    def constant(self) -> bytes | None:
        kind = self.take(1)[0]
        if kind == 0:  # nil
            return None
        if kind == 1:  # boolean
            self.take(1)
            return None
        if kind == 3:  # number
            self.take(self.num_size)
            return None
        if kind == 4:
            return self.string()
        raise ValueError(f"unknown constant type {kind}")

    def function(self) -> Iterator[GlobalUse]:
        self.string()  # source name
        self.take(2 * struct.calcsize(self.int_fmt) + 4)  # line range, upvalues, params, vararg, stack
        code = [self.unpack(self.instr_fmt) for _ in range(self.int())]
        constants = [self.constant() for _ in range(self.int())]
        nested = [list(self.function()) for _ in range(self.int())]
        lines = [self.int() for _ in range(self.int())]
        for _ in range(self.int()):  # local variables: name, start pc, end pc
            self.string()
            self.int()
            self.int()
        for _ in range(self.int()):  # upvalue names
            self.string()
        for pc, instruction in enumerate(code):
            op = instruction & 0x3F
            if op in (OP_GETGLOBAL, OP_SETGLOBAL):
                name = constants[instruction >> 14] or b"?"
                yield GlobalUse(name.decode(), op == OP_SETGLOBAL, lines[pc] if pc < len(lines) else 0)
        for uses in nested:
            yield from uses


def global_uses(source: str) -> list[GlobalUse]:
    """Every global read or written anywhere in the chunk (functions included)."""
    _, is_51 = _lua()
    if not is_51:
        pytest.skip("lupa has no Lua 5.1 runtime (lupa.lua51): the global check reads Lua 5.1 bytecode")
    return list(_Reader(compile_lua(source)).function())


def undeclared_globals(source: str) -> list[str]:
    """Global writes (Redis refuses them all) and reads of names Redis does not provide."""
    lines = source.splitlines()
    found = []
    for use in global_uses(source):
        if use.write or use.name not in ALLOWED_GLOBALS:
            text = lines[use.line - 1].strip() if 0 < use.line <= len(lines) else ""
            found.append(f"line {use.line}: {'writes' if use.write else 'reads'} global {use.name!r}: {text}")
    return found


# --- the rendered scripts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(scripts.ALL))
def test_script_compiles_under_lua_5_1(name: str) -> None:
    compile_lua(scripts.ALL[name])


@pytest.mark.parametrize("name", sorted(scripts.ALL))
def test_script_uses_no_undeclared_global(name: str) -> None:
    assert undeclared_globals(scripts.ALL[name]) == []


# --- the checker itself -------------------------------------------------------------------------------


def test_a_syntax_error_is_reported() -> None:
    with pytest.raises(AssertionError, match="does not compile"):
        compile_lua("local x = \nif then end")


def test_global_assignment_at_top_level_is_flagged() -> None:
    assert undeclared_globals("local a = 1\nx = 1\nreturn a") == ["line 2: writes global 'x': x = 1"]


def test_global_assignment_inside_a_function_is_flagged() -> None:
    source = "local function f()\n  local t = {}\n  for i = 1, 3 do count = i end\n  return t\nend\nreturn f()"
    assert undeclared_globals(source) == ["line 3: writes global 'count': for i = 1, 3 do count = i end"]


def test_assigning_a_provided_global_is_flagged_too() -> None:
    assert [u.name for u in global_uses("string = nil") if u.write] == ["string"]
    assert undeclared_globals("string = nil") != []


def test_reading_an_unknown_global_is_flagged() -> None:
    # a typo, or a helper the script forgot to require
    found = undeclared_globals("local function g() return now_ms() end\nreturn tonumber(ARGV[1]) + g()")
    assert found == ["line 1: reads global 'now_ms': local function g() return now_ms() end"]


def test_locals_upvalues_fields_and_provided_globals_pass() -> None:
    source = """
local P = ARGV[1]
local function K(name) return P .. name end
local t = { a = 1 }
t.b = 2
t['c'] = cjson.encode({ K('x'), string.format('%d', math.floor(1.5)) })
local function outer()
  local n = 0
  local function inner() n = n + 1 end
  inner()
  return n
end
return redis.call('GET', K(t['c'])) or outer()
"""
    assert undeclared_globals(source) == []


# --- the sources -----------------------------------------------------------------------------------------


def _sources() -> dict[str, str]:
    """'claim.lua', 'lib/match.lua'... -> text."""
    root = scripts.lua_dir()
    found = {f.name: f.read_text(encoding="utf-8") for f in root.iterdir() if f.name.endswith(".lua")}
    found.update({f"lib/{f.name}": f.read_text(encoding="utf-8")
                  for f in (root / "lib").iterdir() if f.name.endswith(".lua")})
    return found


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


def test_one_file_per_script_and_no_stray_file() -> None:
    assert {n.removesuffix(".lua") for n in _sources() if "/" not in n} == set(scripts.SCRIPTS) == set(scripts.ALL)


@pytest.mark.parametrize("path", sorted(_sources()))
def test_every_file_starts_with_a_header(path: str) -> None:
    header = _header(_sources()[path])
    assert header, f"{path} does not start with a comment header"
    described = [h for h in header if not re.match(r"--\s*(requires|provides):", h) and h.strip("- ")]
    assert described, f"{path}: the header does not say what the file does"
    assert sum(h.startswith("-- requires:") for h in header) <= 1, f"{path}: more than one requires line"
    if "/" not in path:
        text = "\n".join(header)
        assert header[0].startswith("-- requires:"), f"{path}: a script declares its helpers on its first line"
        for part in ("-- KEYS:", "-- ARGV:", "-- Returns"):
            assert part in text, f"{path}: the header does not document {part.strip('-: ')}"


@pytest.mark.parametrize("path", sorted(p for p in _sources() if p.startswith("lib/")))
def test_a_helpers_provides_line_names_its_functions(path: str) -> None:
    text = _sources()[path]
    header = " ".join(h.lstrip("- ") for h in _header(text))
    listed = re.search(r"provides:(.*?)(?:requires:|$)", header)
    assert listed, f"{path}: no provides line"
    defined = set(re.findall(r"^local function (\w+)", text, re.MULTILINE))
    assert set(re.findall(r"\w+", listed.group(1))) == defined


def test_every_helper_is_used_by_a_script() -> None:
    sources = _sources()
    used: set[str] = set()
    pending = [h for name in scripts.SCRIPTS for h in scripts.requires(sources[f"{name}.lua"])]
    while pending:
        helper = pending.pop()
        if helper not in used:
            used.add(helper)
            pending += scripts.requires(sources[f"lib/{helper}.lua"])
    assert {p.removeprefix("lib/").removesuffix(".lua") for p in sources if p.startswith("lib/")} == used


def test_helpers_come_before_the_helpers_that_use_them() -> None:
    claim = scripts.ALL["claim"]
    positions = [claim.index(f"local function {f}(") for f in ("now_ms", "K", "index_job", "final_fail",
                                                                  "reconcile", "matches")]
    assert positions == sorted(positions)
    assert claim.count("local function now_ms(") == 1  # required by several helpers, included once
