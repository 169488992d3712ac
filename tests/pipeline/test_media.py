"""media.py: data URIs, decoding every image mode, the official keyframe transform, video encoding."""

from __future__ import annotations

import base64
import io
import struct
import threading
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tooncrafter.fixtures import FixtureSet
from tooncrafter.media import MediaError
from tooncrafter.media.images import decode_image, load_image, parse_data_uri
from tooncrafter.media.tensors import preprocess_keyframe, video_to_frames
from tooncrafter.media.video import encode_video, write_video


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


# --------------------------------------------------------------------------------------------
# Data URIs
# --------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 3  # every byte value; its base64 has '+' and '/'


def test_data_uri_standard_base64_and_mime_lowercased():
    uri = "data:image/PNG;base64," + base64.b64encode(PAYLOAD).decode()
    assert parse_data_uri(uri) == ("image/png", PAYLOAD)


def test_data_uri_urlsafe_without_padding_and_whitespace():
    encoded = base64.urlsafe_b64encode(PAYLOAD[:100]).decode().rstrip("=")
    assert "-" in encoded or "_" in encoded
    wrapped = "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20))
    assert parse_data_uri("DATA:Image/Jpeg;BASE64," + wrapped) == ("image/jpeg", PAYLOAD[:100])


def test_data_uri_percent_encoded_base64_and_parameters():
    encoded = urllib.parse.quote(base64.b64encode(PAYLOAD).decode(), safe="")
    assert "%2B" in encoded or "%2F" in encoded
    assert parse_data_uri("data:image/webp;name=a.webp;base64," + encoded) == ("image/webp", PAYLOAD)


def test_data_uri_plain_percent_encoding():
    uri = "data:text/plain;charset=utf-8," + urllib.parse.quote("héllo, wörld")
    assert parse_data_uri(uri) == ("text/plain", "héllo, wörld".encode())
    assert parse_data_uri("data:,abc") == ("text/plain", b"abc")  # RFC 2397 default type


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://example.com/a.png", "must start with 'data:'"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,@@@notbase64", "invalid base64"),
        ("data:image/png;base64,", "no data"),
        ("data:png;base64,AAAA", "type/subtype"),
    ],
)
def test_data_uri_errors(uri, message):
    with pytest.raises(MediaError, match=message):
        parse_data_uri(uri)


def test_media_error_is_a_value_error():
    assert issubclass(MediaError, ValueError)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def test_rgba_flattened_onto_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 3:] = (255, 0, 0, 128)  # half-transparent red -> pink
    image = decode_image(_png_bytes(Image.fromarray(rgba)))
    assert image.mode == "RGB" and image.size == (6, 4)
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    r, g, b = _pixel(image, (5, 3))
    assert r == 255 and 125 <= g <= 129 and g == b


def test_la_flattened_onto_white():
    la = Image.fromarray(np.stack([np.zeros((3, 3), np.uint8), np.full((3, 3), 0, np.uint8)], -1))
    la = la.convert("LA") if la.mode != "LA" else la
    la.putpixel((1, 1), (0, 255))  # one opaque black pixel
    image = decode_image(_png_bytes(la))
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (1, 1)) == (0, 0, 0)


def test_palette_with_transparency_flattened_onto_white():
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 255] + [255, 0, 0] + [0] * (254 * 3))
    palette_image.putpixel((2, 2), 1)
    data = _save(palette_image, "GIF", transparency=0)  # index 0 (blue) is transparent
    image = decode_image(data)
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (2, 2)) == (255, 0, 0)


def test_palette_without_transparency_keeps_colours():
    palette_image = Image.new("P", (2, 2), 0)
    palette_image.putpalette([10, 200, 30] + [0] * 765)
    assert _pixel(decode_image(_png_bytes(palette_image)), (1, 1)) == (10, 200, 30)


def test_greyscale_to_rgb():
    grey = Image.fromarray(np.full((3, 5), 77, np.uint8))
    assert grey.mode == "L"
    image = decode_image(_save(grey, "JPEG", quality=100))
    assert image.size == (5, 3)
    r, g, b = _pixel(image, (2, 1))
    assert r == g == b and abs(r - 77) <= 1


def test_sixteen_bit_greyscale_scaled_to_eight_bit():
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode.startswith("I;16")
    data = _png_bytes(sixteen)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # what Pillow gives back for 16-bit PNG
    image = decode_image(data)
    assert [_pixel(image, (x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_thirty_two_bit_int_and_float_greyscale():
    as_int = Image.fromarray(np.array([[0, 257 * 50, 65535]], np.int32))
    assert as_int.mode == "I"
    image = decode_image(_save(as_int, "TIFF"))
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 50, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert as_float.mode == "F"
    image = decode_image(_save(as_float, "TIFF"))
    assert [_pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_to_rgb():
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    image = decode_image(_save(cmyk, "JPEG", quality=100))
    r, g, b = _pixel(image, (1, 1))
    assert r < 10 and g > 245 and b > 245


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_first_frame(fmt):
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    blue = Image.new("RGB", (8, 6), (0, 0, 255))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = _save(red, fmt, save_all=True, append_images=[blue], duration=100, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = decode_image(data)
    assert image.size == (8, 6)
    r, g, b = _pixel(image, (4, 3))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_applied():
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise rotation
    data = _save(Image.fromarray(stored), "JPEG", quality=100, exif=exif.tobytes())
    image = decode_image(data)
    assert image.size == (20, 40)  # portrait after rotation
    top, bottom = _pixel(image, (10, 5)), _pixel(image, (10, 35))
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size but whose data holds almost no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)  # a few bytes of a row, far from the image the header claims
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_checked_from_header_before_decoding():
    # Decoding this would fail as truncated: only a header check can produce the size message.
    with pytest.raises(MediaError, match="more than the limit"):
        decode_image(_png_header_only(10_000, 10_000), max_pixels=40_000_000)
    real = _png_bytes(Image.new("RGB", (300, 200)))
    with pytest.raises(MediaError, match="60000 pixels"):
        decode_image(real, max_pixels=50_000)
    assert decode_image(real, max_pixels=60_000).size == (300, 200)


def test_pillow_decompression_bomb_is_a_media_error():
    huge = int((Image.MAX_IMAGE_PIXELS or 89_478_485) * 2.5) ** 0.5 + 1
    with pytest.raises(MediaError, match="bomb"):
        decode_image(_png_header_only(int(huge), int(huge)), max_pixels=10**12)


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image at all",
        _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60],  # truncated
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # signature, garbage chunks
        b"",
    ],
)
def test_corrupt_bytes_are_media_errors(data):
    with pytest.raises(MediaError):
        decode_image(data)


def test_truncated_jpeg_is_a_media_error():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _save(noisy, "JPEG")
    with pytest.raises(MediaError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


# --------------------------------------------------------------------------------------------
# Keyframe preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocess_matches_official_fixture(fixture_set: FixtureSet):
    if not fixture_set.has("preproc_src_uint8_hwc", "pipe_keyframe_1", "pipe_keyframe_2"):
        pytest.skip("fixture set has no preprocessing tensors")
    source = fixture_set["preproc_src_uint8_hwc"]
    height, width = fixture_set["pipe_keyframe_1"].shape[-2:]
    for index, name in enumerate(("pipe_keyframe_1", "pipe_keyframe_2")):
        image = Image.fromarray(source[index].numpy())
        for fit in ("cover", "official"):
            ours = preprocess_keyframe(image, height, width, fit=fit)
            assert ours.dtype == torch.float32 and ours.shape == (3, height, width)
            assert torch.equal(ours, fixture_set[name][0]), (name, fit, (ours - fixture_set[name][0]).abs().max())


def _torchvision_official(image: Image.Image, height: int, width: int) -> torch.Tensor:
    transforms = pytest.importorskip("torchvision.transforms")
    transform = transforms.Compose(
        [
            transforms.Resize(min(height, width)),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )
    return transform(image)


SOURCES = [(90, 226), (226, 90), (100, 100), (75, 100), (100, 75), (61, 257), (64, 128), (33, 50)]
TARGETS = [(64, 128), (128, 64), (320, 512), (64, 64), (40, 72)]


@pytest.mark.parametrize(("height", "width"), TARGETS)
def test_preprocess_against_torchvision_for_any_size(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    for src_h, src_w in SOURCES:
        image = Image.fromarray(rng.integers(0, 256, (src_h, src_w, 3), dtype=np.uint8))
        official = _torchvision_official(image, height, width)
        assert torch.equal(preprocess_keyframe(image, height, width, fit="official"), official)
        cover = preprocess_keyframe(image, height, width)
        assert cover.shape == (3, height, width)
        covers_like_official = _official_covers(src_h, src_w, height, width)
        if covers_like_official:
            assert torch.equal(cover, official), (src_h, src_w, height, width)
        else:
            assert not torch.equal(cover, official)
            # cover mode never adds black bars: no full row/column of exact -1 that the source lacks
            assert not (cover == -1).all(dim=0).all(dim=0).any() and not (cover == -1).all(dim=0).all(dim=1).any()


def _official_covers(src_h: int, src_w: int, height: int, width: int) -> bool:
    short = min(height, width)
    if src_w <= src_h:
        new_w, new_h = short, int(short * src_h / src_w)
    else:
        new_h, new_w = short, int(short * src_w / src_h)
    return new_h >= height and new_w >= width


def test_preprocess_value_range_and_errors():
    white = Image.new("RGB", (30, 20), (255, 255, 255))
    black = Image.new("RGB", (30, 20), (0, 0, 0))
    assert torch.equal(preprocess_keyframe(white, 8, 8), torch.ones(3, 8, 8))
    assert torch.equal(preprocess_keyframe(black, 8, 8), -torch.ones(3, 8, 8))
    with pytest.raises(MediaError):
        preprocess_keyframe(white, 8, 8, fit="stretch")  # type: ignore[arg-type]
    with pytest.raises(MediaError):
        preprocess_keyframe(np.zeros((4, 4), np.uint8), 8, 8)


# --------------------------------------------------------------------------------------------
# Frames and video
# --------------------------------------------------------------------------------------------


def test_video_to_frames_official_rounding():
    video = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 6, 1, 1).repeat(3, 1, 1, 1)  # [3, F=6, 1, 1]
    frames = video_to_frames(video)
    assert frames.dtype == np.uint8 and frames.shape == (6, 1, 1, 3)
    # (x+1)/2*255 truncated: 0 -> 127 (not 128), 0.5 -> 191
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 127, 191, 255, 255]


def test_video_to_frames_layout_and_errors():
    video = torch.linspace(-1, 1, 3 * 2 * 4 * 5).view(3, 2, 4, 5)
    frames = video_to_frames(video)
    expected = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert frames.shape == (2, 4, 5, 3) and np.array_equal(frames, expected)
    with pytest.raises(MediaError, match="NaN"):
        video_to_frames(torch.full((3, 2, 4, 4), float("nan")))
    with pytest.raises(MediaError, match=r"\[3, F, H, W\]"):
        video_to_frames(torch.zeros(1, 3, 2, 4, 4))


def _smooth_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Distinct, smooth frames (gradients shifting over time), easy on any codec."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    frames = []
    for t in range(num_frames):
        phase = t / max(1, num_frames)
        r = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * (x + phase)))
        g = 255 * y * np.ones_like(x)
        b = 255 * (1 - x) * np.ones_like(y) * (0.3 + 0.7 * phase)
        frames.append(np.stack([r * np.ones_like(y), g, b], -1))
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def _top_level_atoms(data: bytes) -> list[str]:
    atoms, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        atoms.append(kind.decode("latin-1"))
        if size == 0:
            break
        offset += size
    return atoms


def _decode(data: bytes) -> tuple[dict, np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        info = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "rate": stream.average_rate,
            "size": (stream.codec_context.width, stream.codec_context.height),
            "format": container.format.name,
        }
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return info, frames


@pytest.mark.parametrize("fps", [8, 24, 7])
def test_mp4_is_browser_ready_h264(fps):
    frames = _smooth_frames(16, 64, 96)
    data = encode_video(frames, fps)
    info, decoded = _decode(data)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["rate"] == fps
    assert info["size"] == (96, 64)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3.0  # crf 10: near lossless
    atoms = _top_level_atoms(data)
    assert atoms[0] == "ftyp"
    assert "moov" in atoms and "mdat" in atoms and atoms.index("moov") < atoms.index("mdat"), atoms


def test_mp4_frame_timestamps_are_exact():
    fps = 12
    data = encode_video(_smooth_frames(5, 32, 32), fps)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        times = [float(frame.pts * stream.time_base) for frame in container.decode(stream)]
    assert times == pytest.approx([i / fps for i in range(5)], abs=1e-9)


def test_mp4_odd_size_is_padded_to_even():
    frames = _smooth_frames(4, 33, 47)
    info, decoded = _decode(encode_video(frames, 8))
    assert info["size"] == (48, 34)
    assert decoded.shape == (4, 34, 48, 3)
    assert np.abs(decoded[:, :33, :47].astype(int) - frames.astype(int)).mean() < 5.0  # small frames: chroma blur


def test_webm_round_trip():
    frames = _smooth_frames(6, 48, 64)
    info, decoded = _decode(encode_video(frames, 10, format="webm"))
    assert info["codec"] in ("vp9", "libvpx-vp9", "vp8")
    assert info["pix_fmt"] == "yuv420p"
    assert info["rate"] == 10
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6.0


def test_gif_round_trip_keeps_frames_and_average_rate():
    frames = _smooth_frames(8, 20, 30)
    data = encode_video(frames, 8, format="gif")
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 8 and gif.size == (30, 20)
    durations = []
    for index in range(gif.n_frames):
        gif.seek(index)
        durations.append(gif.info["duration"])
        rgb = np.asarray(gif.convert("RGB"))
        assert np.abs(rgb.astype(int) - frames[index].astype(int)).mean() < 12.0
    assert sum(durations) == 1000  # 8 frames at 8 fps: exactly one second (120/130 ms alternating)


def test_write_video_picks_format_from_suffix(tmp_path: Path):
    frames = _smooth_frames(3, 16, 16)
    for suffix, expected in ((".mp4", "mov,mp4,m4a,3gp,3g2,mj2"), (".webm", "matroska,webm"), (".GIF", "gif")):
        path = write_video(frames, tmp_path / f"clip{suffix}", fps=8)
        assert _decode(path.read_bytes())[0]["format"] == expected
    with pytest.raises(MediaError, match="suffix|format"):
        write_video(frames, tmp_path / "clip.avi", fps=8)


def test_encode_video_rejects_bad_input():
    with pytest.raises(MediaError, match="uint8"):
        encode_video(np.zeros((2, 8, 8, 3), np.float32), 8)
    with pytest.raises(MediaError, match="fps"):
        encode_video(np.zeros((2, 8, 8, 3), np.uint8), 0)
    with pytest.raises(MediaError, match="format"):
        encode_video(np.zeros((2, 8, 8, 3), np.uint8), 8, format="avi")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# load_image: path, data URI, http(s)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def image_png() -> bytes:
    return _png_bytes(Image.new("RGB", (12, 7), (10, 20, 30)))


def test_load_image_from_path(tmp_path: Path, image_png: bytes):
    path = tmp_path / "key.png"
    path.write_bytes(image_png)
    for source in (path, str(path)):
        image = load_image(source)
        assert image.size == (12, 7) and _pixel(image, (0, 0)) == (10, 20, 30)
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="limit"):
        load_image(path, max_bytes=10)


def test_load_image_from_data_uri(image_png: bytes):
    uri = "data:image/PNG;base64," + base64.b64encode(image_png).decode()
    assert load_image(uri).size == (12, 7)
    with pytest.raises(MediaError, match="image/\\*"):
        load_image("data:text/html;base64," + base64.b64encode(image_png).decode())
    with pytest.raises(MediaError, match="limit"):
        load_image(uri, max_bytes=16)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[bytes, bool]] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        body, with_length = self.routes.get(self.path, (None, True))
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # body ends when the connection closes
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def http_server(image_png: bytes):
    big = _png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)))
    _Handler.routes = {
        "/key.png": (image_png, True),
        "/big.png": (big, True),
        "/big-stream.png": (big, False),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", len(big)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_load_image_from_http(http_server):
    base, big_size = http_server
    image = load_image(f"{base}/key.png")
    assert image.size == (12, 7) and _pixel(image, (3, 3)) == (10, 20, 30)
    assert load_image(f"{base}/big-stream.png", max_bytes=big_size).size == (200, 200)
    with pytest.raises(MediaError, match="limit"):
        load_image(f"{base}/big.png", max_bytes=big_size - 1)  # refused from Content-Length
    with pytest.raises(MediaError, match="limit"):
        load_image(f"{base}/big-stream.png", max_bytes=1000)  # no Content-Length: counted while streaming
    with pytest.raises(MediaError, match="404"):
        load_image(f"{base}/missing.png")
