"""The endpoint contract of `fal-ai/toon-crafter`: request and response models.

These pydantic models are the API documentation (OpenAPI) and the single place where input rules
live: every violation becomes a 422 naming the field before any work is queued, and the CLI maps
the same errors to exit code 2.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from tooncrafter.keyframes import check_keyframe_lengths, inbetween_frames, plan_clip

MAX_KEYFRAMES = 16
MAX_SEED = 2**32 - 1
# Sketch guidance strength: both public re-implementations default their `control_scale` to 0.6 and
# offer 0..2 (mattyamonaca/ToonCrafter_with_SketchGuidance, kijai/ComfyUI-DynamiCrafterWrapper).
DEFAULT_SKETCH_SCALE = 0.6
MAX_SKETCH_SCALE = 2.0
# Sketches per request: each is one more URL the worker fetches. 64 covers every frame of the 512 model's
# longest clip without keep_all_frames (a loop at frame_multiplier 4).
MAX_SKETCHES = 64

EXAMPLE_KEYFRAMES = [
    "https://storage.googleapis.com/falserverless/web-examples/tooncrafter/image-1.png",
    "https://storage.googleapis.com/falserverless/web-examples/tooncrafter/image-2.png",
    "https://storage.googleapis.com/falserverless/web-examples/tooncrafter/image-3.png",
]


class SketchImage(BaseModel):
    """Line art for one output frame (extension input `sketch_image_urls`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    frame: int = Field(
        ...,
        ge=0,
        description="The output frame (0-based, in the final clip: after loop and frame_multiplier) this drawing guides.",
    )
    url: str = Field(
        ...,
        min_length=1,
        description=(
            "The drawing: an http(s) URL, a `data:` URI or a URL of this server's own storage, fetched like the "
            "keyframes. Dark lines on light paper or light lines on dark (told apart by the median grey); "
            "resized and cropped like the keyframes."
        ),
    )
    extract_lines: bool = Field(
        False,
        description=(
            "The image is an ordinary picture (e.g. a keyframe), not line art: its edges, found with the Canny "
            "operator (kornia.filters.canny on the greyscale frame), become the sketch."
        ),
    )


class ToonCrafterInput(BaseModel):
    """Input of the `fal-ai/toon-crafter` endpoint (same names, defaults and ranges as fal's)."""

    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,  # NaN/Infinity are a 422 naming the field, never a number that compares false
        json_schema_extra={
            "examples": [
                {
                    "prompt": "A army general swings his arm",
                    "keyframe_image_urls": EXAMPLE_KEYFRAMES,
                }
            ]
        },
    )

    keyframe_image_urls: list[str] = Field(
        ...,
        min_length=2,
        max_length=MAX_KEYFRAMES,
        description=(
            "The keyframes to interpolate between, in order: 2 to 16 images, each an http(s) URL, a "
            "`data:` URI (base64) or a URL of this server's own storage. Two keyframes give the official "
            "ToonCrafter pipeline; more are interpolated pair by pair (see keyframe_lengths)."
        ),
    )
    prompt: str = Field("", max_length=2000, description="Text describing the motion; empty means no text guidance.")
    steps: int = Field(50, ge=1, le=100, description="Number of DDIM denoising steps.")
    cfg_scale: float = Field(
        7.5, ge=1.0, le=30.0, description="Classifier-free guidance scale; 1.0 disables the unconditional pass."
    )
    eta: float = Field(1.0, ge=0.0, le=1.0, description="DDIM stochasticity: 0 is deterministic DDIM, 1 is ancestral-like.")
    motion_steps: int = Field(
        10,
        ge=1,
        le=100,
        description="The model's frame-stride (fs) condition: lower values give more motion between keyframes.",
    )
    fps: int = Field(8, ge=1, le=60, description="Frames per second of the output video.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Random seed; the same seed and inputs give the same video. Random when absent."
    )
    keyframe_lengths: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description=(
            "Frames per keyframe when their runs are laid end to end: one entry per keyframe, each >= 1, summing "
            "to the model's temporal length (16). It places keyframe i on the output frame at the centre of its run "
            "(scaled so the first and last keyframes are the first and last frames). With two keyframes it cannot "
            "change the result (the model pins only the first and last frame). With `loop` the runs go around a "
            "cycle of 16 frames: keyframe 1 on frame 0, keyframe i at its run's centre counted from keyframe 1's "
            "centre, and the clip wraps back to keyframe 1 after the last run (two keyframes are then always half "
            "the cycle apart, so it changes nothing there either)."
        ),
    )
    keep_all_frames: bool = Field(
        False,
        description=(
            "Extension (not in fal's schema): with more than two keyframes, keep every frame of every pair's window "
            "instead of fitting the clip into 16 frames: (N-1)*15+1 frames (N*15 with loop)."
        ),
    )
    loop: bool = Field(
        False,
        description=(
            "Extension: a seamless loop. A last transition goes from the last keyframe back to the first, so the clip "
            "repeats without a jump; the first frame is not repeated at the end of the file. The clip keeps its "
            "frame count (16, or N*15 with keep_all_frames)."
        ),
    )
    frame_multiplier: Literal[1, 2, 4] = Field(
        1,
        description=(
            "Extension: 2 or 4 runs the model again between every two adjacent frames of the clip (and from the last "
            "back to the first with loop) and keeps 1 or 3 of its in-betweens: (F-1)*m+1 frames for F frames "
            "(F*m with loop), the first pass's frames (the keyframes among them) unchanged. fps is not changed, so "
            "the clip plays m times longer; raise fps by m for the same duration. Each extra pass costs about F "
            "windows of sampling."
        ),
    )
    sketch_image_urls: list[SketchImage] | None = Field(
        None,
        max_length=MAX_SKETCHES,
        description=(
            "Extension: sketch guidance. Line art for chosen output frames, a list of `{frame, url}` (any subset of "
            "frames, each at most once); the sketch encoder (ToonCrafter's released sketch_encoder.ckpt, a "
            "ControlNet) steers those frames and frames without a sketch get no guidance. `frame` counts frames of "
            "the final clip, after loop and frame_multiplier. At most 64 sketches."
        ),
    )
    sketch_scale: float = Field(
        DEFAULT_SKETCH_SCALE,
        ge=0.0,
        le=MAX_SKETCH_SCALE,
        description="Extension: strength of the sketch guidance, 0 to 2; 0 ignores the sketches.",
    )

    @field_validator("keyframe_image_urls")
    @classmethod
    def _non_empty_urls(cls, urls: list[str]) -> list[str]:
        for i, url in enumerate(urls):
            if not isinstance(url, str) or not url.strip():
                raise ValueError(f"keyframe {i} is empty")
        return [u.strip() for u in urls]

    @field_validator("sketch_image_urls")
    @classmethod
    def _one_sketch_per_frame(cls, sketches: list[SketchImage] | None) -> list[SketchImage] | None:
        # the frames' upper bound needs the served model (`check_request_fits_model`)
        if not sketches:
            return sketches
        first: dict[int, int] = {}
        for index, sketch in enumerate(sketches):
            if not sketch.url.strip():
                raise ValueError(f"entry {index} has an empty url")
            if sketch.frame in first:
                raise ValueError(f"frame {sketch.frame} has two sketches (entries {first[sketch.frame]} and {index})")
            first[sketch.frame] = index
        return [sketch.model_copy(update={"url": sketch.url.strip()}) for sketch in sketches]

    @field_validator("keyframe_lengths")
    @classmethod
    def _one_length_per_keyframe(cls, lengths: list[int] | None, info: ValidationInfo) -> list[int] | None:
        # a field validator (not a model one) so that the 422 and the CLI error name `keyframe_lengths`; the
        # sum needs the served model's frame count and is checked by `check_fits_model`
        urls = info.data.get("keyframe_image_urls")
        if lengths is not None and urls is not None:
            check_keyframe_lengths(lengths, len(urls), None)
        return lengths


def field_default(name: str) -> Any:
    """The endpoint's default of field `name`, for every other caller (CLI, `GenerationRequest`, playground)."""
    return ToonCrafterInput.model_fields[name].default


def field_help(name: str, model: Literal["input", "sketch"] = "input") -> str:
    """The one-line explanation of field `name` (the OpenAPI description) of the input or of one sketch entry,
    for the CLI's help."""
    fields = (ToonCrafterInput if model == "input" else SketchImage).model_fields
    return fields[name].description or ""


def contract_defaults() -> dict[str, Any]:
    """Every optional field with its default: what a form needs to start from (the playground)."""
    return {name: info.default for name, info in ToonCrafterInput.model_fields.items() if not info.is_required()}


class ContractError(ValueError):
    """An input that is valid on its own but does not fit the served model; `field` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_fits_model(num_keyframes: int, keyframe_lengths: list[int] | None, num_frames: int) -> None:
    """The rules that need the model's frame count T, checked wherever T is known (CLI, submit, worker).

    Every keyframe needs its own output frame, so a T-frame model places at most T keyframes; and
    `keyframe_lengths` must lay out exactly T frames (`keyframes.check_keyframe_lengths`, the one rule).
    """
    if num_keyframes > num_frames:
        raise ContractError(
            "keyframe_image_urls",
            f"this model makes {num_frames}-frame clips, so it can place at most {num_frames} keyframes; got {num_keyframes}",
        )
    if keyframe_lengths is not None:
        try:
            check_keyframe_lengths(keyframe_lengths, num_keyframes, num_frames)
        except ValueError as exc:
            raise ContractError("keyframe_lengths", str(exc)) from None


def check_request_fits_model(inputs: ToonCrafterInput, num_frames: int) -> int:
    """Every rule that needs the served model's frame count T (`check_fits_model`, the frame multiplier, the
    sketches' frames); returns the number of frames the request makes."""
    num_keyframes = len(inputs.keyframe_image_urls)
    check_fits_model(num_keyframes, inputs.keyframe_lengths, num_frames)
    try:
        inbetween_frames(num_frames, inputs.frame_multiplier)
    except ValueError as exc:
        raise ContractError("frame_multiplier", str(exc)) from None
    plan = plan_clip(
        num_keyframes, num_frames, inputs.keyframe_lengths,
        keep_all=inputs.keep_all_frames, loop=inputs.loop, multiplier=inputs.frame_multiplier,
    )
    total = plan.num_output_frames
    for index, sketch in enumerate(inputs.sketch_image_urls or ()):
        if sketch.frame >= total:
            raise ContractError(
                "sketch_image_urls",
                f"entry {index}: frame {sketch.frame} is past the clip, which has {total} frames (0 to {total - 1})",
            )
    return total


class File(BaseModel):
    """A file the service stores and serves (fal's `File`)."""

    url: str = Field(..., description="Where to download the file.")
    content_type: str = Field("video/mp4", description="MIME type of the file.")
    file_name: str = Field(..., description="File name.")
    file_size: int = Field(..., ge=0, description="Size in bytes.")


class ToonCrafterOutput(BaseModel):
    """Output of the endpoint: the video and the seed that made it."""

    video: File
    seed: int = Field(..., ge=0, le=MAX_SEED, description="The seed used; pass it back to reproduce the video.")


# ------------------------------------------------------------------------------------------------
# Validation errors in our own words
# ------------------------------------------------------------------------------------------------

_ITEM_NOUNS = {"keyframe_image_urls": "keyframes", "keyframe_lengths": "entries", "sketch_image_urls": "sketches"}


def _bound(ctx: dict[str, Any], key: str) -> Any:
    value = ctx.get(key)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error entry -> what is wrong, in plain words, without pydantic's prefixes.

    The field itself is not named here: the API prefixes its dotted body path, the CLI its option.
    """
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    noun = _ITEM_NOUNS.get(loc[-1] if loc else "", "items")
    given = error.get("input")
    if kind == "missing":
        return "is required"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} {noun}, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} {noun}, got {ctx.get('actual_length')}"
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    comparisons = {
        "greater_than_equal": ("ge", ">="),
        "less_than_equal": ("le", "<="),
        "greater_than": ("gt", ">"),
        "less_than": ("lt", "<"),
    }
    if kind in comparisons:
        key, sign = comparisons[kind]
        shown = f", got {given!r}" if isinstance(given, (int, float)) and math.isfinite(given) else ""
        return f"must be {sign} {_bound(ctx, key)}{shown}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be one of {ctx['expected']}"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("string_type", "string_sub_type"):
        return "must be a string"
    if kind in ("list_type", "tuple_type"):
        return "must be a list"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a JSON object"
    if kind in ("json_invalid", "json_type"):
        return "is not valid JSON"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    message = str(error.get("msg", "is invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message
