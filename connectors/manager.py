"""The plugin manager and the typed facade the daemon uses instead of ``pm.hook``.

Every hook call is guarded per plugin: a plugin whose hook raises has that contribution skipped
with one ERROR line naming it (and remembered in ``problems`` for the worker record), while the
other plugins' contributions still count.

Plugins come from three places, in this order: the built-ins (``BUILTINS``, registered explicitly
so that a frozen binary has them), the ``emp_worker`` entry points of installed packages, and the
plugins directory (``EMP_PLUGINS_DIR``, see ``plugins_path``): each ``.py`` file and each package
(a folder with ``__init__.py``) there is imported as a module of that name and registered. A file
that fails to import, or whose hooks do not match the specs, is named in one ERROR line and left
out; the others load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from connectors import a1111, comfyui, hookspecs, rest, simulation
from connectors.base import Connector, ConnectorConfig, Outcome
from connectors.settings import ConnectorSettings
from connectors.stores import OutputStore
from connectors.stores import builtin as builtin_stores
from worker import __version__
from worker.errors import ConfigError

log = logging.getLogger("emp.plugins")

BUILTINS: tuple[object, ...] = (simulation, rest, a1111, comfyui, builtin_stores)
SLOW_HOOK_S = 0.1
PLUGINS_DIR_OFF = "off"  # EMP_PLUGINS_DIR=off: no plugins directory
PLUGIN_PATH_ATTR = "__emp_plugin_path__"  # set on each module loaded from the plugins directory
MAX_CAPABILITY_BYTES = 8192


def get_plugin_manager(*, load_entry_points: bool = True, plugins_dir: Path | None = None) -> pluggy.PluginManager:
    """Specs, then the built-ins (explicitly, so a frozen binary has them), then entry points,
    then the plugin files of `plugins_dir` (each checked on its own)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in BUILTINS:
        pm.register(plugin)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    if plugins_dir is not None:
        load_plugins_dir(pm, plugins_dir)
    return pm


def plugins_path(setting: str) -> Path | None:
    """The plugins directory ``EMP_PLUGINS_DIR`` names: a path; ``off`` for none; unset for the
    default, ``plugins/`` beside the executable of a frozen binary and none for a pip install
    (whose plugins are installed packages with an ``emp_worker`` entry point)."""
    if setting == PLUGINS_DIR_OFF:
        return None
    if setting:
        return Path(setting)
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent / "plugins"
    return None


def plugin_sources(directory: Path) -> list[tuple[str, Path]]:
    """(module name, file to import) of each plugin in `directory`, in name order: ``name.py``
    files and ``name/__init__.py`` packages; names starting with ``_`` or ``.`` are skipped."""
    if not directory.is_dir():
        return []
    found: list[tuple[str, Path]] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            found.append((entry.stem, entry))
        elif entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").is_file():
            found.append((entry.name, entry / "__init__.py"))
    return found


def load_plugins_dir(pm: pluggy.PluginManager, directory: Path) -> list[str]:
    """Import and register every plugin of `directory`; the names of those registered. A plugin
    that cannot be imported or registered is named in one ERROR line and skipped."""
    loaded: list[str] = []
    for name, path in plugin_sources(directory):
        try:
            module = _import_plugin(name, path)
        except Exception as exc:  # SyntaxError, ImportError, anything its top level raises
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            log.error("plugin %s (%s) could not be loaded: %s: %s; skipped", name, path, type(exc).__name__, first)
            continue
        try:
            pm.register(module, name=name)
            pm.check_pending()
        except Exception as exc:  # pluggy.PluginValidationError: a hook no spec has, bad arguments
            if pm.is_registered(module):
                pm.unregister(module)
            sys.modules.pop(name, None)
            log.error("plugin %s (%s) could not be registered: %s; skipped", name, path,
                      " ".join(str(exc).split())[:300])
            continue
        loaded.append(name)
    return loaded


def _import_plugin(name: str, path: Path) -> ModuleType:
    """Import `path` as module `name` (a package's own submodules and relative imports work)."""
    if name in sys.modules:
        raise ImportError(f"a module named {name!r} is already loaded; rename the plugin")
    package = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    module.__dict__[PLUGIN_PATH_ATTR] = str(path.parent if package else path)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@dataclass(frozen=True)
class ConnectorInfo:
    """One installed connector: what ``emp-worker plugins`` lists."""

    name: str
    services: tuple[str, ...]
    plugin: str
    package: str
    version: str
    cls: type[Connector]


class Plugins:
    """Typed, guarded access to the hooks."""

    def __init__(self, pm: pluggy.PluginManager | None = None, *, plugins_dir: Path | None = None) -> None:
        self.pm = pm or get_plugin_manager(plugins_dir=plugins_dir)
        #: "plugin: hook failed: ..." for each hook whose last call failed
        self.problems: dict[str, str] = {}
        self._settings: dict[type[Connector], ConnectorSettings] = {}

    # --- guarded calls -------------------------------------------------------------------------

    def _call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a hook; a raising one is logged, recorded and skipped."""
        results: list[tuple[str, Any]] = []
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
            key = f"{impl.plugin_name}.{hook_name}"
            started = time.monotonic()
            try:
                result = impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as exc:
                self._problem(key, f"plugin {impl.plugin_name}: {hook_name} failed: {type(exc).__name__}: "
                              f"{str(exc)[:300]}")
                continue
            self.problems.pop(key, None)
            took = time.monotonic() - started
            if took > SLOW_HOOK_S:
                log.warning("plugin %s: %s took %.2fs; hooks must not block", impl.plugin_name, hook_name, took)
            results.append((impl.plugin_name, result))
        return results

    def _problem(self, key: str, message: str) -> None:
        """Remember why a plugin's contribution was skipped; log it once per new message."""
        if self.problems.get(key) != message:
            log.error("%s; its contribution is skipped", message)
        self.problems[key] = message

    def _dists(self) -> dict[int, tuple[str, str]]:
        found = {id(plugin): (dist.project_name, dist.version) for plugin, dist in self.pm.list_plugin_distinfo()}
        for plugin in BUILTINS:
            found[id(plugin)] = ("emp-worker (built-in)", __version__)
        for _, plugin in self.pm.list_name_plugin():
            path = getattr(plugin, PLUGIN_PATH_ATTR, None)
            if isinstance(path, str):
                found[id(plugin)] = (path, str(getattr(plugin, "__version__", "-")))
        return found

    # --- connectors ----------------------------------------------------------------------------

    def installed(self) -> list[ConnectorInfo]:
        """Every connector class the plugins provide (duplicates included), in name order."""
        dists = self._dists()
        plugin_objects = dict(self.pm.list_name_plugin())
        infos: list[ConnectorInfo] = []
        for plugin_name, batch in self._call_each("emp_connectors"):
            package, version = dists.get(id(plugin_objects.get(plugin_name)), (plugin_name, "?"))
            if not isinstance(batch, list | tuple):
                batch = [batch]  # e.g. `return MyConnector`: checked (and refused) below
            for cls in batch:
                try:
                    _check_class(cls, plugin_name)
                except ConfigError as exc:  # one plugin's bad class must not hide the others
                    self._problem(f"{plugin_name}.emp_connectors", str(exc))
                    continue
                infos.append(ConnectorInfo(cls.name, tuple(cls.service_types), plugin_name, package, version, cls))
        return sorted(infos, key=lambda i: (i.name, i.plugin))

    def connector_classes(self) -> dict[str, type[Connector]]:
        return {info.name: info.cls for info in self.installed()}

    def classes_for(self, names: Sequence[str]) -> list[type[Connector]]:
        """The connector classes `names` refer to, their settings loaded; ConfigError for an
        unknown or doubly provided name, or a service two of them run."""
        by_name: dict[str, list[ConnectorInfo]] = {}
        for info in self.installed():
            if not any(i.cls is info.cls for i in by_name.get(info.name, [])):
                by_name.setdefault(info.name, []).append(info)
        selected = ",".join(names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"EMP_CONNECTORS={selected!r}: unknown connector {unknown[0]!r}; "
                              f"available: {', '.join(sorted(by_name))}")
        for name in names:
            infos = by_name[name]
            if len(infos) > 1:
                where = " and ".join(f"{i.plugin} ({i.package})" for i in infos)
                raise ConfigError(f"EMP_CONNECTORS={selected!r}: connector {name!r} is provided twice, by {where}; "
                                  "uninstall one of them")
        classes = [by_name[n][0].cls for n in names]
        owner: dict[str, str] = {}
        for cls in classes:
            if cls not in self._settings:
                self._settings[cls] = cls.load_settings()  # a bad EMP_<NAME>_* stops start-up here
            for service in cls.services_for(self._settings[cls]):  # configured services count too
                if service in owner and owner[service] != cls.name:
                    raise ConfigError(f"EMP_CONNECTORS={selected!r}: connectors {owner[service]!r} and {cls.name!r} "
                                      f"both run service {service!r}; a service needs exactly one connector")
                owner[service] = cls.name
        return classes

    def create_connectors(self, names: Sequence[str], config: ConnectorConfig) -> list[Connector]:
        """One instance of each named connector for one slot (ConfigError if one cannot be made)."""
        instances: list[Connector] = []
        for cls in self.classes_for(names):
            try:
                instances.append(cls(dataclasses.replace(config, settings=self._settings[cls])))
            except Exception as exc:
                raise ConfigError(f"connector {cls.name!r} could not be created: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}") from exc
        return instances

    # --- output stores -------------------------------------------------------------------------

    def store_classes(self) -> dict[str, type[OutputStore]]:
        """Every output store by name and alias; ConfigError when two plugins claim one name."""
        found: dict[str, type[OutputStore]] = {}
        for plugin_name, batch in self._call_each("emp_output_stores"):
            for cls in batch if isinstance(batch, list | tuple) else [batch]:
                if not (isinstance(cls, type) and issubclass(cls, OutputStore) and cls.name):
                    self._problem(f"{plugin_name}.emp_output_stores",
                                  f"plugin {plugin_name}: emp_output_stores returned {cls!r}, not a named OutputStore")
                    continue
                for name in (cls.name, *cls.aliases):
                    if found.get(name, cls) is not cls:
                        raise ConfigError(f"output store {name!r} is provided twice ({found[name].__module__} and "
                                          f"{cls.__module__}); uninstall one of them")
                    found[name] = cls
        return found

    # --- other hooks ---------------------------------------------------------------------------

    def extra_capabilities(self, worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for plugin_name, part in self._call_each("emp_capabilities", worker_id=worker_id,
                                                 capabilities=dict(capabilities)):
            problem = _capability_problem(part)
            key = f"{plugin_name}.emp_capabilities"
            if problem:
                self._problem(key, f"plugin {plugin_name}: emp_capabilities returned {problem}")
            elif part:
                extra.update(part)
        return extra

    def job_finished(self, job_id: str, service: str, outcome: Outcome, duration_s: float) -> None:
        self._call_each("emp_job_finished", job_id=job_id, service=service, outcome=outcome.value,
                        duration_s=duration_s)


def _capability_problem(part: Any) -> str:
    """Why a hook's capability contribution cannot be used ('' when it can)."""
    if part is None:
        return ""
    if not isinstance(part, dict):
        return f"{type(part).__name__}, not a dict"
    try:
        size = len(json.dumps(part, allow_nan=False))
    except (TypeError, ValueError) as exc:
        return f"a value that is not JSON ({exc})"
    if size > MAX_CAPABILITY_BYTES:
        return f"{size} bytes of JSON, over the {MAX_CAPABILITY_BYTES} allowed"
    return ""


def _check_class(cls: Any, plugin: str) -> None:
    """A class a plugin returned from emp_connectors must be a usable Connector subclass."""
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise ConfigError(f"plugin {plugin}: emp_connectors returned {cls!r}, which is not a Connector class")
    name = getattr(cls, "name", None)
    services = getattr(cls, "service_types", None)
    if not isinstance(name, str) or not name or "," in name:
        raise ConfigError(f"plugin {plugin}: {cls.__name__}.name must be a non-empty string without commas")
    if not isinstance(services, tuple | list) or not services or not all(isinstance(s, str) and s for s in services):
        raise ConfigError(f"plugin {plugin}: {cls.__name__}.service_types must be a non-empty tuple of strings")
    limit = cls.max_concurrent_jobs
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"plugin {plugin}: {cls.__name__}.max_concurrent_jobs must be None or at least 1")
