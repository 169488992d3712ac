"""uint8 frames -> video files that play in browsers: H.264 mp4 (faststart), VP9 WebM, GIF."""

from __future__ import annotations

import io
import logging
import numbers
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

from tooncrafter.media import MediaError

logger = logging.getLogger(__name__)

DEFAULT_CRF = 10  # the official scripts save with libx264 crf 10

VideoFormat = Literal["mp4", "webm", "gif"]
VIDEO_CONTENT_TYPES: dict[str, str] = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}

# H.264 encoders in order of preference: software first (always work), hardware ones last
# (present in the wheel's list but they fail to open without the device).
_H264_ENCODERS = ("libx264", "libopenh264", "h264_videotoolbox", "h264_mf", "h264_nvenc", "h264_qsv", "h264_amf")


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
