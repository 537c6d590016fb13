"""A faithful fake of AUTOMATIC1111's Stable Diffusion WebUI API (v1.10.1), for the a1111
connector's tests: server.py (routes, auth, errors), engine.py (the generation), wire.py (the
fixtures' shapes). tests/fakes/test_a1111_fake.py pins it to the fixtures."""

from tests.fakes.a1111.engine import Checkpoint, Engine, Generation, State
from tests.fakes.a1111.server import FakeA1111

__all__ = ["Checkpoint", "Engine", "FakeA1111", "Generation", "State"]
