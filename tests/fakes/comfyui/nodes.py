"""The node classes the fake knows: their /object_info definitions and what "running" each one does.

A node never computes pixels; values are small descriptions (`Image(width, height, batch, color)`), enough for
GetImageSize's text, SaveImage's real PNG files and validation's type checks. Input specs are written exactly as
/object_info returns them (`["INT", {"default": 512, "min": 1}]`, `[[choices...], {}]`, `["IMAGE"]`), because
validation errors echo them back as `input_config`. Tests add classes with `FakeComfyUI.register_node(NodeSpec)`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tests.fakes.comfyui import media


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    batch: int = 1
    color: int = 0


@dataclass(frozen=True)
class Latent:
    width: int
    height: int
    batch: int = 1


@dataclass(frozen=True)
class Opaque:
    """MODEL, CLIP, VAE, CONDITIONING, AUDIO...: a named token."""

    kind: str
    name: str = ""


class NodeFailure(Exception):
    """Raised by a node's run function: becomes execution_error with this exception_type and message."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


@dataclass
class NodeResult:
    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None  # the `executed` output and the history `outputs` entry
    ticks: int = 0  # progress ticks (value/max) while the node runs
    first_tick: int = 1  # samplers report 1..steps; SaveImageWebsocket 0..n-1 (never reaches max)
    tick_images: list[bytes] | None = None  # one image per tick sent as a preview frame (SaveImageWebsocket)
    text: str | None = None  # a binary TEXT frame (GetImageSize), broadcast to every socket


class NodeContext(Protocol):
    node_id: str
    graph: dict[str, Any]
    extra_data: dict[str, Any]
    sampler_previews: bool

    def save(self, folder: str, prefix: str, ext: str, data: bytes, *, trailing: str = "_") -> dict[str, Any]: ...

    def read_input(self, name: str) -> bytes | None: ...

    def input_names(self) -> list[str]: ...

    def checkpoints(self) -> list[str]: ...


Run = Callable[[NodeContext, dict[str, Any]], NodeResult]


@dataclass(frozen=True)
class NodeSpec:
    name: str
    required: dict[str, list[Any]]
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    run: Run | None = None
    display_name: str | None = ""  # "" = the class name; None is sent as null (V3 nodes such as ImageBlur)
    category: str = "fake"
    description: str = ""
    python_module: str = "nodes"
    hidden: dict[str, str] = field(default_factory=dict)
    optional: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # extra /object_info keys (V3 nodes carry more)
    # a dynamic choice list (LoadImage's input files, CheckpointLoaderSimple's checkpoints), filled per request
    choices: Callable[[NodeContext], dict[str, list[str]]] | None = None
    # like a node's VALIDATE_INPUTS: returns a message for custom_validation_failed (those inputs skip the list check)
    custom_validation: Callable[[NodeContext, str, Any], str | None] | None = None
    custom_inputs: tuple[str, ...] = ()

    def object_info(self, dynamic: dict[str, list[str]] | None = None) -> dict[str, Any]:
        required = dict(self.required)
        for name, options in (dynamic or {}).items():
            required[name] = [options, *self.required[name][1:]]
        inputs: dict[str, Any] = {"required": required}
        order: dict[str, list[str]] = {"required": list(required)}
        if self.optional:
            inputs["optional"], order["optional"] = dict(self.optional), list(self.optional)
        if self.hidden:
            inputs["hidden"], order["hidden"] = dict(self.hidden), list(self.hidden)
        names = self.output_names if self.output_names is not None else self.outputs
        info = {
            "input": inputs, "input_order": order, "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs), "output_name": list(names), "name": self.name,
            "display_name": self.name if self.display_name == "" else self.display_name,
            "description": self.description, "python_module": self.python_module, "category": self.category,
            "output_node": self.output_node,
        }
        info.update(self.extra)
        return info


INT_WH = {"default": 512, "min": 1, "max": 16384, "step": 1}
PNG_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]


def tip(text: str, **options: Any) -> dict[str, Any]:
    """Input options with the tooltip last, as /object_info lists them."""
    return {**options, "tooltip": text}


def _images(value: Any) -> Image:
    return value if isinstance(value, Image) else Image(64, 64)


def _png_text(ctx: NodeContext) -> dict[str, str]:
    import json

    text = {"prompt": json.dumps(ctx.graph)}
    for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
        text[str(key)] = json.dumps(value)
    return text


def _save_images(ctx: NodeContext, inputs: dict[str, Any], folder: str, prefix: str) -> NodeResult:
    image = _images(inputs["images"])
    data = media.png(image.width, image.height, image.color, _png_text(ctx))
    saved = [ctx.save(folder, prefix, "png", data) for _ in range(image.batch)]
    return NodeResult(ui={"images": saved})


def _empty_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((Image(int(i["width"]), int(i["height"]), int(i["batch_size"]), int(i["color"])),))


def _invert(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    image = _images(i["image"])
    return NodeResult((Image(image.width, image.height, image.batch, image.color ^ 0xFFFFFF),))


def _passthrough(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((_images(i["image"]),))


def _scale(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    image = _images(i["image"])
    return NodeResult((Image(int(i["width"]), int(i["height"]), image.batch, image.color),))


def _size(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    image = _images(i["image"])
    text = f"width: {image.width}, height: {image.height}\n batch size: {image.batch}"
    return NodeResult((image.width, image.height, image.batch), text=text)


def _save(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return _save_images(ctx, i, "output", str(i["filename_prefix"]))


def _preview(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return _save_images(ctx, i, "temp", f"ComfyUI_temp_{suffix}")


def _save_ws(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    image = _images(i["images"])
    frame = media.png(image.width, image.height, image.color)
    return NodeResult(ticks=image.batch, first_tick=0, tick_images=[frame] * image.batch)


def _load_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    name = str(i["image"])
    size = media.png_size(ctx.read_input(name) or b"")
    if size is None:
        raise NodeFailure("PIL.UnidentifiedImageError", f"cannot identify image file '/opt/ComfyUI/input/{name}'\n")
    return NodeResult((Image(size[0], size[1]), Opaque("MASK")))


def _checkpoint(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    name = str(i["ckpt_name"])
    return NodeResult((Opaque("MODEL", name), Opaque("CLIP", name), Opaque("VAE", name)))


def _encode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((Opaque("CONDITIONING", str(i["text"])[:64]),))


def _latent(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((Latent(int(i["width"]), int(i["height"]), int(i["batch_size"])),))


def _sampler(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = i["latent_image"] if isinstance(i["latent_image"], Latent) else Latent(512, 512)
    steps = int(i["steps"])
    if "end_at_step" in i:
        steps = max(0, min(steps, int(i["end_at_step"])) - int(i.get("start_at_step", 0)))
    previews = [media.png(max(1, latent.width // 8), max(1, latent.height // 8), 0x336699)] * steps
    return NodeResult((latent,), ticks=steps, tick_images=previews if ctx.sampler_previews else None)


def _decode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = i["samples"] if isinstance(i["samples"], Latent) else Latent(512, 512)
    return NodeResult((Image(latent.width, latent.height, latent.batch, 0x808080),))


def _save_webp(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    saved = ctx.save("output", str(i["filename_prefix"]), "webp", media.TINY_WEBP)
    return NodeResult(ui={"images": [saved], "animated": [True]})


def _load_audio(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult((Opaque("AUDIO", str(i["audio"])),))


def _save_audio(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return NodeResult(ui={"audio": [ctx.save("output", str(i["filename_prefix"]), "flac", media.flac())]})


def _video_combine(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    saved = ctx.save("output", str(i["filename_prefix"]), "mp4", media.mp4(), trailing="")
    saved.update({"format": str(i["format"]), "frame_rate": float(i["frame_rate"])})
    return NodeResult(ui={"gifs": [saved]})


def _preview_any(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    value = i["source"]
    return NodeResult(ui={"text": [value if isinstance(value, str) else repr(value)]})


def _image_file_exists(ctx: NodeContext, name: str, value: Any) -> str | None:
    return None if str(value) in ctx.input_names() else f"Invalid image file: {value}"


def _input_files(ctx: NodeContext) -> dict[str, list[str]]:
    return {"image": ctx.input_names()}


def _checkpoint_names(ctx: NodeContext) -> dict[str, list[str]]:
    return {"ckpt_name": ctx.checkpoints()}


_SAMPLER_INPUTS: dict[str, list[Any]] = {
    "model": ["MODEL", tip("The model used for denoising the input latent.")],
    "seed": ["INT", tip("The random seed used for creating the noise.", default=0, min=0, max=18446744073709551615,
                        control_after_generate=True)],
    "steps": ["INT", tip("The number of steps used in the denoising process.", default=20, min=1, max=10000)],
    "cfg": ["FLOAT", tip("The Classifier-Free Guidance scale balances creativity and adherence to the prompt.",
                         default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)],
    "sampler_name": [SAMPLERS, tip("The algorithm used when sampling.")],
    "scheduler": [SCHEDULERS, tip("The scheduler controls how noise is gradually removed to form the image.")],
    "positive": ["CONDITIONING", tip("The conditioning describing the attributes you want to include in the image.")],
    "negative": ["CONDITIONING", tip("The conditioning describing the attributes you want to exclude from the image.")],
    "latent_image": ["LATENT", tip("The latent image to denoise.")],
}

BUILTIN_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("EmptyImage", {
        "width": ["INT", dict(INT_WH)], "height": ["INT", dict(INT_WH)],
        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
        "color": ["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}],
    }, ("IMAGE",), run=_empty_image, category="image"),
    NodeSpec("ImageInvert", {"image": ["IMAGE"]}, ("IMAGE",), run=_invert, display_name="Invert Image",
             category="image"),
    NodeSpec("ImageBlur", {
        "image": ["IMAGE", {}], "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31, "step": 1}],
        "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}],
    }, ("IMAGE",), run=_passthrough, python_module="comfy_extras.nodes_post_processing",
        category="image/postprocessing", display_name=None,
        extra={"output_tooltips": [None], "deprecated": False, "experimental": False, "api_node": False}),
    NodeSpec("ImageScale", {
        "image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
        "width": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
        "height": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
        "crop": [["disabled", "center"], {}],
    }, ("IMAGE",), run=_scale, display_name="Upscale Image", category="image/upscaling"),
    NodeSpec("GetImageSize", {"image": ["IMAGE"]}, ("INT", "INT", "INT"), ("width", "height", "batch_size"),
             run=_size, display_name="Get Image Size", hidden={"unique_id": "UNIQUE_ID"},
             python_module="comfy_extras.nodes_images", category="image",
             description="Returns width and height of the image, and passes it through unchanged."),
    NodeSpec("SaveImage", {
        "images": ["IMAGE", {"tooltip": "The images to save."}],
        "filename_prefix": ["STRING", tip("The prefix for the file to save. This may include formatting information "
                                          "such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values "
                                          "from nodes.", default="ComfyUI")],
    }, output_node=True, run=_save, display_name="Save Image", hidden=dict(PNG_HIDDEN), category="image",
        description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("PreviewImage", {"images": ["IMAGE"]}, output_node=True, run=_preview, display_name="Preview Image",
             hidden=dict(PNG_HIDDEN), category="image",
             description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("SaveImageWebsocket", {"images": ["IMAGE"]}, output_node=True, run=_save_ws,
             python_module="custom_nodes.websocket_image_save", category="api/image"),
    NodeSpec("LoadImage", {"image": [[], {"image_upload": True}]}, ("IMAGE", "MASK"), run=_load_image,
             display_name="Load Image", category="image", choices=_input_files,
             custom_validation=_image_file_exists, custom_inputs=("image",)),
    NodeSpec("CheckpointLoaderSimple", {"ckpt_name": [[], tip("The name of the checkpoint (model) to load.")]},
             ("MODEL", "CLIP", "VAE"), run=_checkpoint, display_name="Load Checkpoint", category="loaders",
             choices=_checkpoint_names,
             description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
             extra={"output_tooltips": ["The model used for denoising latents.", "The CLIP model used for encoding "
                                        "text prompts.", "The VAE model used for encoding and decoding images to and "
                                        "from latent space."]}),
    NodeSpec("CLIPTextEncode", {
        "text": ["STRING", tip("The text to be encoded.", multiline=True, dynamicPrompts=True)],
        "clip": ["CLIP", tip("The CLIP model used for encoding the text.")],
    }, ("CONDITIONING",), run=_encode, display_name="CLIP Text Encode (Prompt)", category="conditioning",
        description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                    "diffusion model towards generating specific images.",
        extra={"output_tooltips": ["A conditioning containing the embedded text used to guide the diffusion model."]}),
    NodeSpec("EmptyLatentImage", {
        "width": ["INT", tip("The width of the latent images in pixels.", default=512, min=16, max=16384, step=8)],
        "height": ["INT", tip("The height of the latent images in pixels.", default=512, min=16, max=16384, step=8)],
        "batch_size": ["INT", tip("The number of latent images in the batch.", default=1, min=1, max=4096)],
    }, ("LATENT",), run=_latent, display_name="Empty Latent Image", category="latent",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        extra={"output_tooltips": ["The empty latent image batch."]}),
    NodeSpec("KSampler", {**_SAMPLER_INPUTS, "denoise": ["FLOAT", tip(
        "The amount of denoising applied.", default=1.0, min=0.0, max=1.0, step=0.01)]},
        ("LATENT",), run=_sampler, category="sampling",
        description="Uses the provided model, positive and negative conditioning to denoise the latent image.",
        extra={"output_tooltips": ["The denoised latent."]}),
    NodeSpec("KSamplerAdvanced", {
        **_SAMPLER_INPUTS, "start_at_step": ["INT", {"default": 0, "min": 0, "max": 10000}],
        "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}],
    }, ("LATENT",), run=_sampler, display_name="KSampler (Advanced)", category="sampling"),
    NodeSpec("VAEDecode", {"samples": ["LATENT", tip("The latent to be decoded.")],
                           "vae": ["VAE", tip("The VAE model used for decoding the latent.")]},
             ("IMAGE",), run=_decode, display_name="VAE Decode", category="latent",
             description="Decodes latent images back into pixel space images.",
             extra={"output_tooltips": ["The decoded image."]}),
    NodeSpec("SaveAnimatedWEBP", {
        "images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}],
        "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
    }, output_node=True, run=_save_webp, category="image/animation"),
    NodeSpec("LoadAudio", {"audio": ["STRING", {}]}, ("AUDIO",), run=_load_audio, category="audio"),
    NodeSpec("SaveAudio", {"audio": ["AUDIO"], "filename_prefix": ["STRING", {"default": "audio/ComfyUI"}]},
             output_node=True, run=_save_audio, display_name="Save Audio (FLAC)", category="audio"),
    NodeSpec("VHS_VideoCombine", {
        "images": ["IMAGE"], "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
        "filename_prefix": ["STRING", {"default": "AnimateDiff"}],
        "format": [["image/gif", "image/webp", "video/h264-mp4"], {}],
    }, output_node=True, run=_video_combine, python_module="custom_nodes.comfyui-videohelpersuite",
        display_name="Video Combine", category="Video Helper Suite"),
    NodeSpec("PreviewAny", {"source": ["*", {}]}, output_node=True, run=_preview_any, display_name="Preview Any",
             category="utils"),
)
