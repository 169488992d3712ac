"""The pixel edge of the library: images in, video out.

Three modules, so that a process imports only what it needs: `images` turns bytes into RGB
pictures (data URIs, files, URLs, decoding with bomb and mode handling; no torch, no PyAV),
`tensors` turns pictures into model input and model output into uint8 frames (the official
resize/crop/normalise and uint8 conversion; torch), and `video` turns frames into H.264 mp4 /
WebM / GIF files (PyAV; no torch). An API-only process needs `images` alone.
"""

from __future__ import annotations


class MediaError(ValueError):
    """An input that cannot become a keyframe, or frames that cannot become a video."""
