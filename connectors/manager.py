"""The plugin manager and the typed facade the daemon uses instead of ``pm.hook``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy

from connectors import hookspecs, simulation
from connectors.base import Connector, ConnectorConfig
from worker.errors import ConfigError, ConnectorError

BUILTINS: tuple[object, ...] = (simulation,)


def get_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """Specs, then the built-ins (explicitly, so a frozen binary has them), then entry points."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in BUILTINS:
        pm.register(plugin)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm


class Plugins:
    """Typed access to the hooks."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm or get_plugin_manager()

    def connector_classes(self) -> dict[str, type[Connector]]:
        found: dict[str, type[Connector]] = {}
        for batch in self.pm.hook.emp_connectors():
            for cls in batch:
                if not (isinstance(cls, type) and issubclass(cls, Connector)):
                    raise ConnectorError(f"plugin returned {cls!r}, which is not a Connector class")
                found[cls.name] = cls
        return found

    def classes_for(self, names: Sequence[str]) -> list[type[Connector]]:
        """The connector classes `names` refer to; ConfigError for an unknown name."""
        classes = self.connector_classes()
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ConfigError(
                f"EMP_CONNECTORS={','.join(names)!r}: unknown connector {unknown[0]!r}; "
                f"available: {', '.join(sorted(classes))}"
            )
        return [classes[n] for n in names]

    def create_connectors(self, names: Sequence[str], config: ConnectorConfig) -> list[Connector]:
        return [cls(config) for cls in self.classes_for(names)]

    def extra_capabilities(self, worker_id: str, capabilities: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for part in self.pm.hook.emp_capabilities(worker_id=worker_id, capabilities=capabilities):
            if part:
                extra.update(part)
        return extra

    def job_finished(self, job_id: str, service: str, outcome: str, duration_s: float) -> None:
        self.pm.hook.emp_job_finished(
            job_id=job_id, service=service, outcome=outcome, duration_s=duration_s
        )
