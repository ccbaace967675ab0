"""The HTML report of a generation run: each sample's prompt, settings, a spectrogram image and an audio player.

Spectrograms are written as PNG files with numpy and zlib only (log-mel, 80 bands, a built-in dark-to-bright
colour map), so the report needs no plotting library.
"""
from __future__ import annotations

import html
import os
import re
import struct
import zlib
from typing import Sequence

import numpy as np

# Colour map stops (value in [0, 1] -> RGB), from black through purple and orange to pale yellow.
_STOPS = np.array([[0.0, 0, 0, 4], [0.25, 81, 18, 124], [0.5, 183, 55, 121], [0.75, 252, 137, 97],
                   [1.0, 252, 253, 191]])


def _png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image [height, width, 3]."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def slug(text: str) -> str:
    """A file-name stem for a caption: lower-case words joined by '_', at most 40 characters ('sample' if empty)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "sample"


def spectrogram_png(audio: np.ndarray, sample_rate: int, path: str, n_mels: int = 80, hop_seconds: float = 0.01,
                    top_db: float = 80.0) -> str:
    """Writes the log-mel spectrogram of mono audio [samples] as a PNG (time left to right, low bands at the
    bottom, the top `top_db` dB of the clip mapped to the colour scale); returns the path."""
    import librosa
    hop = max(1, int(round(hop_seconds * sample_rate)))
    mel = librosa.feature.melspectrogram(y=np.asarray(audio, np.float32), sr=sample_rate, n_fft=4 * hop,
                                         hop_length=hop, n_mels=n_mels)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    value = np.clip((db - (db.max() - top_db)) / top_db, 0.0, 1.0)[::-1]  # [mels, frames], low bands last
    rgb = np.stack([np.interp(value, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    image = np.repeat(rgb.astype(np.uint8), 2, axis=0)  # 2 pixels per band
    with open(path, "wb") as f:
        f.write(_png(image))
    return path


def write_report(output_dir: str, samples: Sequence[dict], title: str = "musiclm_jax samples") -> str:
    """Writes output_dir/report.html for samples [{'prompt', 'wav', 'spectrogram', 'settings', ...}] (file names
    relative to output_dir); returns its path."""
    rows = []
    for s in samples:
        settings = ", ".join(f"{k}={v}" for k, v in s.get("settings", {}).items())
        score = f"<p>MuLan text-audio similarity: {s['mulan_score']:.3f}</p>" if "mulan_score" in s else ""
        rows.append(f"""<section>
<h2>{html.escape(s['prompt'])}</h2>
<p>{html.escape(settings)}; {s.get('duration_s', 0):.2f} s; generated in {s.get('seconds', 0):.1f} s</p>{score}
<img src="{html.escape(s['spectrogram'])}" alt="spectrogram of {html.escape(s['prompt'])}">
<audio controls src="{html.escape(s['wav'])}"></audio>
</section>""")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}} img{{display:block;max-width:100%}}</style>
</head><body><h1>{html.escape(title)}</h1>
{chr(10).join(rows)}
</body></html>
"""
    path = os.path.join(output_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
