"""The A1111 connector's pure parts as tables: error mapping (over every recorded error example),
progress from A1111's reply, the generation reply, checkpoint names and settings (input hosts:
tests/connectors/test_inputs.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import SecretStr

from connectors.a1111 import A1111Connector, A1111Settings
from connectors.a1111.api import a1111_error, decode_reply, image_type, metadata_of, progress_of
from connectors.a1111.request import (
    advertised,
    checkpoint_aliases,
    choose_checkpoint,
    request_body,
    with_checkpoint,
)
from connectors.manager import Plugins
from connectors.testing import make_connector
from tests.fakes.a1111.wire import fixture, png
from worker.errors import ConfigError, PermanentJobError, RetryableJobError

ERRORS = fixture("errors")["examples"]

# every recorded error example -> permanent or retryable, and words its message must hold
MAPPING = [
    ("auth_missing (--api-auth set, no Authorization header)", PermanentJobError, "check EMP_A1111_AUTH"),
    ("auth_wrong_credentials", PermanentJobError, "Incorrect username or password"),
    ("script_not_found (script_name unknown)", PermanentJobError, "Script 'nope' not found"),
    ("alwayson_script_not_found", PermanentJobError, "always on script nope not found"),
    ("img2img_without_init_images", PermanentJobError, "Init image not found"),
    ("invalid_base64_image", PermanentJobError, "Invalid encoded image"),
    ("url_image_when_requests_disabled", PermanentJobError, "Requests not allowed"),
    ("url_image_pointing_to_local_address", PermanentJobError, "Request to local resource not allowed"),
    ("options_unknown_checkpoint (RuntimeError, not HTTPException)", RetryableJobError, "model 'nope.safetensors'"),
    ("unhandled exception inside generation (e.g. CUDA OOM)", RetryableJobError, "ran out of GPU memory"),
    ("request_validation (steps='abc')", PermanentJobError, "invalid request fields: steps"),
    ("malformed_json_body (body '{not json'; approximate: FastAPI 0.94 wraps json.JSONDecodeError, msg text comes "
     "from Python's json module)", PermanentJobError, "invalid request fields: 1"),
    ("unknown_route", RetryableJobError, "start A1111 with --api"),
    ("wrong_method (GET /sdapi/v1/txt2img)", RetryableJobError, "405"),
]


def test_the_mapping_covers_every_recorded_error() -> None:
    assert {name for name, _, _ in MAPPING} == set(ERRORS)


@pytest.mark.parametrize(("name", "kind", "words"), MAPPING)
def test_recorded_errors_map_to_job_errors(name: str, kind: type[Exception], words: str) -> None:
    example = ERRORS[name]
    error = a1111_error(example["status"], json.dumps(example["json"]).encode(), "application/json",
                        "POST /sdapi/v1/txt2img")
    assert type(error) is kind and words in str(error) and "POST /sdapi/v1/txt2img" in str(error)


def test_error_text_is_redacted() -> None:
    body = json.dumps({"error": "RuntimeError", "detail": "", "body": "", "errors": "token s3cret leaked"}).encode()
    error = a1111_error(500, body, "application/json", "POST /x", redact=lambda t: t.replace("s3cret", "***"))
    assert "s3cret" not in str(error) and "***" in str(error)


# -- progress ---------------------------------------------------------------------------------


def _progress(name: str) -> Any:
    return fixture("progress")["examples"][name]["json"]


def test_progress_from_the_recorded_replies() -> None:
    assert progress_of(_progress("idle")) is None
    running = progress_of(_progress("running"))
    assert running is not None
    assert (running.percent, running.step, running.total_steps, running.eta_s) == (21.0, 8, 20, 11.7)
    assert running.message == "step 8/20, batch 1/2, about 12s left" and not running.interrupted
    assert running.preview_b64 == _progress("running")["current_image"]
    seen = progress_of(_progress("interrupted_flag_seen"))
    assert seen is not None and seen.interrupted and seen.percent == 51.0


@pytest.mark.parametrize(("reply", "expected"), [
    ({"progress": 0.5, "state": {"job_count": -1}}, None),  # between begin() and the first batch
    ({"progress": 3, "eta_relative": -2, "state": {"job_count": 1, "sampling_step": 0, "sampling_steps": 0}},
     (100.0, None, None, "starting")),
    ({"progress": "x", "state": {"job_count": 1, "sampling_step": 5, "sampling_steps": 10}},
     (0.0, 5, None, "step 5/10")),
    ("not a dict", None),
])
def test_progress_of_odd_replies(reply: Any, expected: tuple[Any, ...] | None) -> None:
    progress = progress_of(reply)
    if expected is None:
        assert progress is None
    else:
        assert progress is not None
        assert (progress.percent, progress.step, progress.eta_s, progress.message) == expected


# -- the generation reply ---------------------------------------------------------------------


def test_the_recorded_reply_decodes_to_one_png_and_metadata() -> None:
    reply = fixture("txt2img")["example_response"]["json"]
    generated = decode_reply(reply)
    [image] = generated.images
    assert image_type(image) == ("image/png", "png")
    meta = metadata_of(generated.info)
    assert (meta["seed"], meta["sampler"], meta["steps"], meta["model"]) == (1234, "Euler a", 20, "v1-5-pruned-emaonly")
    assert meta["model_hash"] == "6ce0161689" and meta["scheduler"] == "Automatic"


def test_the_grid_is_left_out_by_index_of_first_image() -> None:
    images = [base64.b64encode(png(2, 1, (i, i, i))).decode() for i in range(3)]
    generated = decode_reply({"images": images, "info": json.dumps({"index_of_first_image": 1})})
    assert generated.images == [png(2, 1, (1, 1, 1)), png(2, 1, (2, 2, 2))]


@pytest.mark.parametrize("reply", [{"images": ["not base64!"]}, {"images": [1]}, {"images": "x"}, []])
def test_a_broken_reply_is_retryable(reply: Any) -> None:
    with pytest.raises(RetryableJobError):
        decode_reply(reply)


def test_metadata_is_bounded() -> None:
    meta = metadata_of({"prompt": "p" * 10_000, "all_seeds": list(range(1000)), "infotexts": ["x"] * 500})
    assert len(meta["prompt"]) == 2000 and len(meta["seeds"]) == 64 and len(meta["infotexts"]) == 64


@pytest.mark.parametrize(("data", "expected"), [
    (b"\xff\xd8\xff\xe0....", ("image/jpeg", "jpg")),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", ("image/webp", "webp")),
    (b"????", ("application/octet-stream", "bin")),
])
def test_image_types(data: bytes, expected: tuple[str, str]) -> None:
    assert image_type(data) == expected


# -- payloads and checkpoints -----------------------------------------------------------------

MODELS = fixture("control_endpoints")["endpoints"]["GET /sdapi/v1/sd-models"]["response"]["json"]
TITLE = "v1-5-pruned-emaonly.safetensors [6ce0161689]"


def test_every_name_of_a_checkpoint_leads_to_its_title() -> None:
    aliases = checkpoint_aliases(MODELS)
    for name in (TITLE, "v1-5-pruned-emaonly", "v1-5-pruned-emaonly.safetensors", "6ce0161689"):
        assert aliases[name] == TITLE
    assert advertised(MODELS) == ["v1-5-pruned-emaonly", "v1-5-pruned-emaonly.safetensors", TITLE]
    assert checkpoint_aliases([{"title": None}, "junk", {"model_name": "x"}]) == {}


@pytest.mark.parametrize(("body", "required", "expected"), [
    ({}, [], None),
    ({}, ["some-lora", "v1-5-pruned-emaonly"], TITLE),  # the first required model that is a checkpoint
    ({"override_settings": {"sd_model_checkpoint": "6ce0161689"}}, ["other"], TITLE),
])
def test_choose_checkpoint(body: dict[str, Any], required: list[str], expected: str | None) -> None:
    assert choose_checkpoint(body, required, checkpoint_aliases(MODELS)) == expected


def test_with_checkpoint_keeps_the_payloads_restore_choice() -> None:
    body = with_checkpoint({"override_settings_restore_afterwards": True}, TITLE, restore=False)
    assert body == {"override_settings": {"sd_model_checkpoint": TITLE}, "override_settings_restore_afterwards": True}
    assert with_checkpoint({}, TITLE, restore=False)["override_settings_restore_afterwards"] is False
    assert with_checkpoint({"a": 1}, None, restore=False) == {"a": 1}


@pytest.mark.parametrize(("payload", "message"), [
    ([1], "must be a JSON object"),
    ({"endpoint": "extras"}, "endpoint must be one of"),
    ({"override_settings": "x"}, "override_settings must be an object"),
])
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentJobError, match=message):
        request_body(payload)


# -- settings and registration ----------------------------------------------------------------


@pytest.mark.parametrize(("env", "slot", "url"), [
    ({}, 0, "http://127.0.0.1:7860"),
    ({}, 2, "http://127.0.0.1:7862"),
    ({"EMP_A1111_URL": "http://gpu:7861", "EMP_A1111_PORT_STEP": "10"}, 1, "http://gpu:7871"),
    ({"EMP_A1111_URLS": "http://a:1, http://b:2"}, 1, "http://b:2"),
])
def test_each_slot_has_its_url(env: dict[str, str], slot: int, url: str) -> None:
    connector = make_connector(A1111Connector, gpu_index=slot, env=env)
    assert connector.url == url


def test_bad_auth_stops_start_up_without_showing_it() -> None:
    with pytest.raises(ConfigError, match="EMP_A1111_AUTH must be user:pass") as caught:
        make_connector(A1111Connector, env={"EMP_A1111_AUTH": "hunter2-no-colon"})
    assert "hunter2" not in str(caught.value)


def test_auth_is_a_secret_in_the_settings() -> None:
    settings = A1111Settings(auth=SecretStr("user:pw"))
    assert "pw" not in repr(settings) and settings.basic_auth("EMP_A1111_AUTH") == ("user", "pw")


def test_a1111_is_a_builtin_connector() -> None:
    assert Plugins().connector_classes()["a1111"] is A1111Connector
