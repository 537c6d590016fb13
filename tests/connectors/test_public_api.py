"""`connectors` is the whole public plugin API: its exports are pinned, the README's example
imports nothing else, and every hook is documented."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import connectors
from connectors import hookspecs

ROOT = Path(__file__).resolve().parents[2]

EXPORTED = {
    "ConfigError", "Connector", "ConnectorConfig", "ConnectorSettings", "EngineSettings", "Health",
    "HealthState", "HttpEngine", "Job", "JobCancelled", "JobContext", "JobError", "JobResult", "Outcome",
    "Output", "OutputStore", "PermanentJobError", "RetryableJobError", "StopReason", "StoreError", "Stored",
    "StreamedResponse", "Upload", "error_for_status", "hookimpl", "slot_url",
}


def test_the_public_api_is_exactly_this() -> None:
    assert set(connectors.__all__) == EXPORTED
    assert all(hasattr(connectors, name) for name in connectors.__all__)


def _readme_connector_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a connector"):]
    found: list[str] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return found[0]


def test_the_readme_example_imports_only_from_connectors() -> None:
    tree = ast.parse(_readme_connector_example())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert modules == {"connectors"}
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert names <= EXPORTED


def test_the_readme_example_runs() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_readme_connector_example(), "README.md", "exec"), namespace)  # our own README's code
    classes = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, connectors.Connector)
               and v is not connectors.Connector]
    assert classes and all(c.name and c.service_types for c in classes)


def test_every_hook_is_prefixed_typed_and_documented() -> None:
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("emp_")]
    assert {h.__name__ for h in hooks} == {"emp_connectors", "emp_capabilities", "emp_job_finished",
                                           "emp_output_stores"}
    for hook in hooks:
        assert hook.__doc__ and "Called" in hook.__doc__, hook.__name__
        assert "return" in hook.__annotations__ and all(p in hook.__annotations__
                                                        for p in inspect.signature(hook).parameters)
    readme = (ROOT / "README.md").read_text()
    assert all(h.__name__ in readme for h in hooks)
