"""A fake ComfyUI 0.3.64: a real aiohttp HTTP + WebSocket server on 127.0.0.1, for connector tests.

It behaves like the server whose traces are in shared/fixtures/comfyui (COMFYUI.md §1), and
tests/fakes/test_comfyui_fake.py pins its message order and shapes to copies of those traces.

Start it::

    async with FakeComfyUI() as fake:          # 127.0.0.1:<free port>
        fake.url, fake.ws_url, fake.port        # "http://127.0.0.1:54321", "ws://127.0.0.1:54321/ws"

Every route is also served under /api: POST/GET /prompt, GET /history[/{id}] (?max_items&offset),
POST /history {delete|clear}, GET/POST /queue {delete|clear}, POST /interrupt [{prompt_id}], GET /view,
POST /upload/image, GET /system_stats, /features, /object_info[/{class}], /models[/{folder}], /embeddings,
POST /free, GET /ws?clientId=. With behaviour.jobs_api: /api/jobs, /api/jobs/{id}, /api/jobs/{id}/cancel,
/api/jobs/cancel.

How a prompt runs. POST /prompt validates the graph against the known node classes (nodes.BUILTIN_NODES:
EmptyImage, ImageInvert, ImageBlur, ImageScale, GetImageSize, LoadImage, SaveImage, PreviewImage,
SaveImageWebsocket, CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, KSamplerAdvanced,
VAEDecode, SaveAnimatedWEBP, LoadAudio, SaveAudio, VHS_VideoCombine, PreviewAny; add more with
fake.register_node(NodeSpec(...))) and answers 400 with 0.3.64's error bodies, or 200 (possibly with
node_errors). One worker then runs the queue, lowest `number` first, node by node in ComfyUI's order, sending
the real message sequence: status, execution_start, execution_cached, per node progress_state / executing /
progress ticks / binary previews / executed, then execution_success|error|interrupted, history write,
status, executing{node:null}. Nodes whose inputs did not change since the last prompt are cached.
- KSampler* ticks `steps` times (value 1..steps); SaveImageWebsocket ticks once per image (0..n-1) with a
  PNG preview frame each; GetImageSize sends a TEXT frame. A tick waits behaviour.step_delay_s, a node
  behaviour.node_delay_s (or behaviour.node_delays[class_type]).
- SaveImage writes real PNGs (<prefix>_00001_.png, type output), PreviewImage type temp files,
  SaveAnimatedWEBP .webp ("animated": [true]), SaveAudio .flac ("audio"), VHS_VideoCombine .mp4 ("gifs"),
  PreviewAny {"text": [...]}. GET /view serves them; fake.files holds them (put inputs there too).
- LoadImage loads an uploaded (or fake.files.put("input", ...)) file: not a PNG -> execution_error
  PIL.UnidentifiedImageError, as in execution_error.json; unknown name -> custom_validation_failed.
- CheckpointLoaderSimple accepts behaviour.models["checkpoints"] (value_not_in_list otherwise).

Knobs (fake.behaviour, read when they matter; see behaviour.Behaviour):
    step_delay_s, node_delay_s, node_delays      time per tick / node
    pickup_delay_s, start_delay_s                idle worker's pickup latency; gap execution_start -> _cached
    prompt_response_delay_s                      POST /prompt answers after the WS messages (pitfall 1)
    history_delay_s                              GET /history/{id} is {} right after execution_success (pitfall 2)
    history_empty_reads                          N more {} reads after the write (beyond 0.3.64; a retry test)
    fail = Failure(node=, class_type=, exception_type=, exception_message=, at_tick=)   execution_error
    sampler_previews                             KSampler latent previews (binary frames) on/off
    cache                                        False = --cache-none
    silent_ws                                    sockets stay open, nothing is sent
    jobs_api                                     newer /api/jobs routes (§1.6)
    require_uuid_prompt_id                       newer 400 invalid_prompt_id
    check_origin                                 403 on an Origin/Host mismatch
    models, devices, ram_total, ram_free         /models, /system_stats
Preview format: a socket whose FIRST text frame is feature_flags {supports_preview_metadata: true} gets
format-4 frames (before `progress`), others format 1 (after `progress`).

Control and records:
    hold = fake.hold("10")           node 10 waits after its `executing` until hold.release();
    await hold.wait_reached()        ...so a test can interrupt, disconnect, or kill mid-node, without sleeps
    await fake.wait_idle()           queue empty and every message written
    fake.submit(graph, client_id=None)       queue a prompt as another client would
    fake.broadcast_other_client()    another client's progress/progress_state/TEXT reaching every socket
    fake.send(event, data, sid=None), fake.send_binary(frame, sid=None)   arbitrary messages
    await fake.drop_websockets()     abort every /ws connection (no close frame); HTTP keeps working
    await fake.kill()                SIGKILL/SIGINT: all connections drop (1006), the port refuses
    await fake.restart()             same port, empty queue/history, number back to 0, temp files gone
    fake.prompts (Submitted), fake.interrupts (InterruptCall: body, running, hit), fake.queue_deletes
    (POST /queue bodies), fake.uploads (Upload), fake.frees, fake.cancels, fake.requests, fake.sockets
    (clientIds in the socket table), fake.engine.history / .running / .pending_items(), fake.hub.sent
media.decode_frame(bytes) splits a binary frame; media.png(w, h, color) makes a real PNG.

Socket routing follows 0.3.64 exactly: status broadcast; execution_* / executing / executed only to the
prompt's client (nothing without client_id); progress / progress_state / previews to the client or, with no
client_id, to everyone; TEXT frames to everyone; one socket per clientId, and closing any socket of a
clientId unregisters it (a newer duplicate then gets nothing); a socket reconnecting with the running
prompt's clientId gets status then executing{node} with no prompt_id.
"""

from tests.fakes.comfyui import media
from tests.fakes.comfyui.behaviour import Behaviour, Failure, InterruptCall, Submitted, Upload
from tests.fakes.comfyui.execution import Hold
from tests.fakes.comfyui.nodes import BUILTIN_NODES, Image, Latent, NodeContext, NodeFailure, NodeResult, NodeSpec
from tests.fakes.comfyui.server import FakeComfyUI
from tests.fakes.comfyui.validation import Rejected

__all__ = [
    "BUILTIN_NODES",
    "Behaviour",
    "Failure",
    "FakeComfyUI",
    "Hold",
    "Image",
    "InterruptCall",
    "Latent",
    "NodeContext",
    "NodeFailure",
    "NodeResult",
    "NodeSpec",
    "Rejected",
    "Submitted",
    "Upload",
    "media",
]
