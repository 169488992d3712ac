"""Bytes in, RGB image out: data URIs, files and URLs, decoded the way a person expects to see them.

No torch and no PyAV here: the API process parses and checks inputs with this module alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tooncrafter.media import MediaError

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


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


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's header alone: nothing is decoded (for budgets across images)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as image:
                return image.size
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaError("data is not an image in a format Pillow can read") from exc


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
            return to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise MediaError("data is not an image in a format Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaError(f"image data is corrupt or truncated: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
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
# RGB (or L) image -> the model's frame size
# --------------------------------------------------------------------------------------------


def fit_image(image: Image.Image, height: int, width: int, *, fit: Literal["cover", "official"] = "cover") -> Image.Image:
    """Resize and centre-crop a PIL image (RGB or L) to `height x width`, as the keyframes are
    (`tensors.preprocess_keyframe`), so that anything drawn over a keyframe (a sketch) lands on
    the same pixels. `fit` is explained there."""
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
