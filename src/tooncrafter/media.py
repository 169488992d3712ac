"""Images in, video out: the pixel edge of the library.

Everything a keyframe goes through before it becomes a tensor (data URIs, downloads, decoding with
bomb and mode handling, the official resize/crop/normalise) and everything a sampled video goes
through after it stops being one (the official uint8 conversion, then H.264 mp4 / WebM / GIF).
Only `preprocess_keyframe` and `video_to_frames` touch torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import numbers
import struct
import tempfile
import time
import urllib.parse
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CRF = 10  # the official scripts save with libx264 crf 10

VideoFormat = Literal["mp4", "webm", "gif"]
VIDEO_CONTENT_TYPES: dict[str, str] = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}

# H.264 encoders in order of preference: software first (always work), hardware ones last
# (present in the wheel's list but they fail to open without the device).
_H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_mf", "h264_nvenc", "h264_qsv", "h264_amf")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


class MediaError(ValueError):
    """An input that cannot become a keyframe, or frames that cannot become a video."""


# --------------------------------------------------------------------------------------------
# Bytes in: data URIs, files, URLs
# --------------------------------------------------------------------------------------------


def parse_data_uri(uri: str, *, max_bytes: int | None = None) -> tuple[str, bytes]:
    """Split an RFC 2397 `data:` URI into (lower-cased MIME type, payload bytes).

    Accepts standard and URL-safe base64 (padding optional, whitespace ignored) and plain
    percent-encoded payloads. MIME types are compared case-insensitively elsewhere, so they are
    lower-cased here (fal_client.encode_image writes `image/PNG`). With `max_bytes`, a payload over the
    limit is refused before it is decoded (a service must not allocate what it will reject).
    """
    if not isinstance(uri, str) or uri[:5].lower() != "data:":
        raise MediaError("not a data URI: it must start with 'data:'")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URI: no ',' between the media type and the data")
    params = [p.strip() for p in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    if is_base64:
        params = params[:-1]
    mime = (params[0] if params else "").lower() or "text/plain"  # RFC 2397 default
    if "/" not in mime:
        raise MediaError(f"malformed data URI: media type {mime!r} is not of the form type/subtype")
    # base64 decodes to at most 3/4 of its text, percent-encoding takes at most 3 characters a byte
    if max_bytes is not None and (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes + 3:
        raise MediaError(f"data URI is larger than the limit of {max_bytes} bytes")
    if is_base64:
        data = _decode_base64(payload)
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError(f"data URI is larger than the limit of {max_bytes} bytes")
    if not data:
        raise MediaError("data URI carries no data")
    return mime, data


def _decode_base64(payload: str) -> bytes:
    text = urllib.parse.unquote(payload) if "%" in payload else payload  # some clients percent-encode '+', '/', '='
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data URI has invalid base64 data: {exc}") from exc


def load_image(
    source: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read a keyframe given as a file path, an http(s) URL or a `data:` URI; returns RGB.

    For the CLI: a URL is fetched with a byte limit and an overall deadline; the service uses its
    own fetcher (which also refuses private addresses) and then `decode_image`.
    """
    if isinstance(source, str) and source[:5].lower() == "data:":
        mime, data = parse_data_uri(source, max_bytes=max_bytes)
        if not (mime.startswith("image/") or mime == "application/octet-stream"):
            raise MediaError(f"data URI has media type {mime!r}, expected an image/* type")
    elif isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https"):
        data = _fetch_url(source, max_bytes=max_bytes, timeout_s=timeout_s)
    else:
        data = _read_file(Path(source), max_bytes=max_bytes)
    return decode_image(data, max_pixels=max_pixels)


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    if not path.is_file():
        raise MediaError(f"image file not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(f"image file {path} is {size} bytes, more than the limit of {max_bytes}")
    return path.read_bytes()


def _fetch_url(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    import httpx  # only the URL path needs it

    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    received = 0
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout_s) as client:
            with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise MediaError(f"fetching {url} failed: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise MediaError(f"{url} is {declared} bytes, more than the limit of {max_bytes}")
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise MediaError(f"{url} is more than the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise MediaError(f"fetching {url} took longer than {timeout_s} s")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching {url} failed: {exc.__class__.__name__}: {exc}") from exc
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Bytes -> RGB image
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image the way a person would expect to see it.

    EXIF orientation is applied; transparency is flattened onto white (line art on a transparent
    background stays visible); greyscale, CMYK and 16-bit/float modes are mapped to 8-bit RGB;
    an animated file gives its first frame. The pixel count is checked from the header before any
    pixel is decoded, so a decompression bomb costs nothing.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MediaError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError("empty image data")
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below; Pillow's warning threshold would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
            width, height = image.size  # from the header: nothing decoded yet
            if width <= 0 or height <= 0:
                raise MediaError(f"image has an empty size {width}x{height}")
            if width * height > max_pixels:
                raise MediaError(
                    f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
                )
            image.seek(0)  # first frame of an animation
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise MediaError("data is not an image in a format Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaError(f"image data is corrupt or truncated: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency composited onto white."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
        mode = image.mode
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale as 16-bit data (x / 257); float as [0, 1] when it fits, else [0, 255]."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 and finite.min() >= 0.0 else 1.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0 / scale, neginf=0.0) * scale
    else:
        values = values / 257.0  # 65535 -> 255
    out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8 -> mode "L"


# --------------------------------------------------------------------------------------------
# RGB image -> model input
# --------------------------------------------------------------------------------------------


def preprocess_keyframe(
    image: Image.Image | np.ndarray,
    height: int,
    width: int,
    *,
    fit: Literal["cover", "official"] = "cover",
) -> torch.Tensor:
    """RGB keyframe -> `[3, height, width]` float32 in [-1, 1], as the official inference transform.

    Official (`load_data_prompts`): `Resize(min(height, width))` (short side, PIL bilinear with
    antialias, long side truncated to int) -> `CenterCrop((height, width))` -> `x / 255` ->
    `(x - 0.5) / 0.5`. When the image's aspect ratio does not cover the frame (a 4:3 picture for
    the 320x512 model, any portrait picture for it), that transform pads black bars into the
    frame. `fit="cover"` (default) scales by whichever side covers the frame instead; it is
    bit-identical to the official transform whenever the official one does not pad.
    `fit="official"` reproduces the padding too.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MediaError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = _to_rgb(image)
    image = fit_image(image, height, width, fit=fit)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # [3, H, W]
    # Same float ops as ToTensor + Normalize(0.5, 0.5), so the result is bit-identical.
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5).contiguous()


def fit_image(image: Image.Image, height: int, width: int, *, fit: Literal["cover", "official"] = "cover") -> Image.Image:
    """Resize and centre-crop a PIL image (RGB or L) to `height x width` as `preprocess_keyframe` does,
    so that anything drawn over a keyframe (a sketch) lands on the same pixels."""
    if height <= 0 or width <= 0:
        raise MediaError(f"target size must be positive, got {height}x{width}")
    src_w, src_h = image.size
    if fit == "cover":
        new_h, new_w = _cover_size(src_h, src_w, height, width)
    elif fit == "official":
        new_h, new_w = _short_side_size(src_h, src_w, min(height, width))
    else:
        raise MediaError(f"fit must be 'cover' or 'official', got {fit!r}")
    if (new_w, new_h) != (src_w, src_h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    return _center_crop(image, height, width)


def _short_side_size(src_h: int, src_w: int, short: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: short side -> `short`, long side `int(short * long / short_src)`."""
    if src_w <= src_h:
        return int(short * src_h / src_w), short
    return short, int(short * src_w / src_h)


def _cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """Smallest aspect-preserving size that covers `height x width` (same rounding as torchvision)."""
    if height * src_w >= width * src_h:  # the image is at least as wide as the frame: height binds
        return height, max(width, int(height * src_w / src_h))
    return max(height, int(width * src_h / src_w)), width


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision `CenterCrop`: zero-pad when smaller (left/top get the floor half), round-half-even offsets."""
    src_w, src_h = image.size
    if width > src_w or height > src_h:
        pad_left = (width - src_w) // 2 if width > src_w else 0
        pad_top = (height - src_h) // 2 if height > src_h else 0
        canvas = Image.new(image.mode, (max(width, src_w), max(height, src_h)), 0)
        canvas.paste(image, (pad_left, pad_top))
        image = canvas
        src_w, src_h = image.size
    top = int(round((src_h - height) / 2.0))
    left = int(round((src_w - width) / 2.0))
    if (top, left, src_h, src_w) == (0, 0, height, width):
        return image
    return image.crop((left, top, left + width, top + height))


# --------------------------------------------------------------------------------------------
# Model output -> frames -> video
# --------------------------------------------------------------------------------------------


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """`[3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]`, as the official saving code.

    clamp to [-1, 1], `(x + 1) / 2`, `* 255`, then truncation by `.to(uint8)`. Non-finite values
    are an error, not grey frames.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise MediaError(f"expected a video [3, F, H, W], got {list(video.shape)}")
    x = video.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise MediaError("video contains NaN or infinite values")
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    frames = (x * 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def encode_video(
    frames: np.ndarray,
    fps: int,
    *,
    format: VideoFormat = "mp4",
    crf: int = DEFAULT_CRF,
) -> bytes:
    """uint8 frames `[F, H, W, 3]` -> the bytes of a video file that plays in browsers.

    mp4: H.264 (libx264 when the PyAV build has it), yuv420p, BT.709 tagged, moov atom first
    (`+faststart`), frame duration exactly 1/fps (the muxer may pick a finer track timescale,
    fps * 2^k). webm: VP9, yuv420p. gif: Pillow, an adaptive palette per frame, delays in GIF's
    10 ms unit rounded so the average rate is exact (identical consecutive frames are merged by
    the GIF writer; the timing stays right). yuv420p needs even sides: an odd
    height or width is padded by repeating the last row/column.
    """
    if format not in VIDEO_CONTENT_TYPES:
        raise MediaError(f"unknown video format {format!r}; expected one of {sorted(VIDEO_CONTENT_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="tooncrafter-video-") as tmp:
        # A real file, not BytesIO: +faststart rewrites the file in a second pass, which needs a path.
        return _write_video(frames, fps, Path(tmp) / f"video.{format}", format, crf).read_bytes()


def write_video(frames: np.ndarray, path: str | Path, fps: int, *, crf: int = DEFAULT_CRF) -> Path:
    """Encode `frames` straight into `path`; the format comes from the suffix (.mp4, .webm, .gif)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in VIDEO_CONTENT_TYPES:
        raise MediaError(f"cannot tell the video format from {path.name!r}; use .mp4, .webm or .gif")
    return _write_video(frames, fps, path, fmt, crf)  # type: ignore[arg-type]


def _write_video(frames: np.ndarray, fps: int, path: Path, format: VideoFormat, crf: int) -> Path:
    frames = _check_frames(frames)
    if not isinstance(fps, numbers.Integral) or isinstance(fps, bool) or fps < 1:
        raise MediaError(f"fps must be a positive integer, got {fps!r}")
    fps = int(fps)
    if format == "gif":
        path.write_bytes(_encode_gif(frames, fps))
    else:
        encoders = _H264_ENCODERS if format == "mp4" else ("libvpx-vp9", "libvpx")
        _encode_with_encoders(frames, fps, path, format, _available_encoders(encoders), crf)
    return path


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise MediaError(f"no pixels to encode: frames shape {list(frames.shape)}")
    return np.ascontiguousarray(frames)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        logger.debug("padding %dx%d frames to even sides for yuv420p", h, w)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _available_encoders(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        if name not in av.codecs_available:
            continue
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - a decoder of that name, or not built: skip it
            continue
        found.append(name)
    return found


def _encode_with_encoders(frames: np.ndarray, fps: int, path: Path, container: str, encoders: list[str], crf: int) -> None:
    if not encoders:
        raise MediaError(f"this PyAV build has no usable encoder for {container}")
    frames = _pad_even(frames)
    errors = []
    for codec in encoders:
        try:
            return _mux_av(frames, fps, path, container, codec, crf)
        except av.FFmpegError as exc:  # e.g. a hardware encoder without its device
            logger.debug("encoder %s failed: %s", codec, exc)
            errors.append(f"{codec}: {exc}")
    raise MediaError(f"could not encode {container}: " + "; ".join(errors))


def _encoder_options(codec: str, crf: int) -> dict[str, str]:
    if codec == "libx264":
        return {"crf": str(crf), "preset": "medium"}
    if codec.startswith("libvpx"):
        # Constant quality mode: crf with a zero bitrate target.
        return {"crf": str(min(63, max(4, crf + 10))), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    return {}


def _mux_av(frames: np.ndarray, fps: int, path: Path, container_format: str, codec: str, crf: int) -> None:
    _, height, width, _ = frames.shape
    container_options = {"movflags": "+faststart"} if container_format == "mp4" else {}
    with av.open(str(path), mode="w", format=container_format, options=container_options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1), options=_encoder_options(codec, crf))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        ctx = stream.codec_context
        ctx.time_base = Fraction(1, fps)
        # Tell players which matrix converted RGB to YUV (BT.709, limited range), as we convert below.
        ctx.colorspace = 1  # AVCOL_SPC_BT709
        ctx.color_primaries = 1  # AVCOL_PRI_BT709
        ctx.color_trc = 1  # AVCOL_TRC_BT709
        ctx.color_range = 1  # AVCOL_RANGE_MPEG
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _encode_gif(frames: np.ndarray, fps: int) -> bytes:
    images = [Image.fromarray(frame) for frame in frames]
    # GIF stores delays in centiseconds: round the frame *start times* so the clip keeps the exact
    # average rate (8 fps -> 12, 13, 12, 13 cs). Browsers slow delays under 2 cs down to 10 cs.
    starts = [int(np.floor(100.0 * i / fps + 0.5)) for i in range(len(images) + 1)]
    durations_ms = [max(2, b - a) * 10 for a, b in zip(starts[:-1], starts[1:])]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations_ms, loop=0, disposal=1
    )
    return buffer.getvalue()
