"""The HTML reports: a generation run's (`write_report`: each sample's prompt, settings, a spectrogram image and
an audio player) and an evaluation's (`write_evaluation_report`: its settings, metrics, published figures beside
ours, and generated and reference samples).

Spectrograms are written as PNG files with numpy and zlib only (log-mel, 80 bands, a built-in dark-to-bright
colour map), so the report needs no plotting library.
"""
from __future__ import annotations

import html
import os
import re
import struct
import zlib
from typing import Any, Sequence

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
    return _write_page(output_dir, title, chr(10).join(rows))


def _write_page(output_dir: str, title: str, body: str, style: str = "") -> str:
    """Writes output_dir/report.html: a page titled `title` around the HTML `body`; returns its path."""
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}} img{{display:block;max-width:100%}}{style}</style>
</head><body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    path = os.path.join(output_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _metric_row(name: str, value: Any) -> str:
    shown = f"{value:.6g}" if isinstance(value, float) else html.escape(str(value))
    return f"<tr><td>{html.escape(name)}</td><td>{shown}</td></tr>"


def _published_table(metrics: dict, published: Sequence) -> str:
    """The report's comparison: each published (metric, system, value, source) row beside our value of the same
    metric ('-' if not computed)."""
    rows = []
    for metric, system, value, source in published:
        ours = metrics.get(metric)
        shown = f"{ours:.4g}" if isinstance(ours, float) else "-"
        rows.append(f"<tr><td>{html.escape(metric)}</td><td>{shown}</td><td>{html.escape(system)}</td>"
                    f"<td>{html.escape(value)}</td><td>{html.escape(source)}</td></tr>")
    return ("<h2>Published figures on MusicCaps</h2><table>\n<tr><th>metric</th><th>ours</th><th>system</th>"
            "<th>published</th><th>source</th></tr>\n" + "\n".join(rows) + "\n</table>")


def write_evaluation_report(output_dir: str, metrics: dict, settings: dict, samples: Sequence[dict],
                            title: str = "musiclm_jax generation evaluation", published: Sequence = ()) -> str:
    """Writes output_dir/report.html: the settings, the metrics table (with `published` rows (metric, system,
    value, source), those figures beside ours) and the samples that have `spectrogram` entries (their generated
    and reference players); file names are relative to output_dir. Returns its path."""
    metric_rows = "\n".join(_metric_row(k, v) for k, v in sorted(metrics.items()) if k != "skipped_metrics")
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                      for k, v in metrics.get("skipped_metrics", {}).items())
    setting_rows = "\n".join(_metric_row(k, v) for k, v in settings.items())
    sections = []
    for s in samples:
        if "spectrogram" not in s:
            continue
        labels = ""
        if s.get("generated_top_labels"):
            labels = (f"<p>classifier, generated: {html.escape(', '.join(s['generated_top_labels']))}; reference: "
                      f"{html.escape(', '.join(s['reference_top_labels']))}</p>")
        sections.append(f"""<section>
<h3>{html.escape(s['caption'])}</h3>
<p>reference {html.escape(s['reference_id'])}; MuLan caption-audio cosine {s['mulan_cosine']:.3f}</p>{labels}
<p>generated</p><img src="{html.escape(s['spectrogram'])}" alt="spectrogram of the generated clip">
<audio controls src="{html.escape(s['wav'])}"></audio>
<p>reference</p><img src="{html.escape(s['reference_spectrogram'])}" alt="spectrogram of the reference clip">
<audio controls src="{html.escape(s['reference_wav'])}"></audio>
</section>""")
    body = f"""<h2>Settings</h2><table>
{setting_rows}
</table>
<h2>Metrics</h2><table>
{metric_rows}
</table>
{f'<p>Skipped:</p><ul>{skipped}</ul>' if skipped else ''}
{_published_table(metrics, published) if published else ''}
<h2>Samples ({len(sections)} of {len(samples)})</h2>
{chr(10).join(sections)}"""
    return _write_page(output_dir, title, body, style="\ntd{padding:0 1em 0 0}")
