"""Captioned-audio records and the bad-input policy: each kind of bad file, made here, is a counted skip under
'skip' and an error naming the file (and line) under 'error'."""
import hashlib
import json
import sys

import numpy as np
import pytest
import soundfile

from musiclm_jax.data import captioned_audio
from musiclm_jax.data.bad_input import BadInputError, BadInputReport
from musiclm_jax.data.captioned_audio import AudioChecks

RATE = 16000


def _noise(seconds, rate=RATE, channels=1, seed=0):
    shape = (int(seconds * rate),) if channels == 1 else (int(seconds * rate), channels)
    return (0.3 * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


def _bad_folder(root):
    """A folder with good files and one of each kind of bad input; returns {reason: what names it}."""
    soundfile.write(root / "good.wav", _noise(1.0), RATE)
    soundfile.write(root / "stereo_44k.flac", _noise(1.0, 44100, channels=2), 44100)   # downmixed + resampled
    (root / "sub").mkdir()
    soundfile.write(root / "sub" / "deep.ogg", _noise(0.5), RATE)
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio")
    (root / "zero.wav").write_bytes(b"")
    soundfile.write(root / "silent.wav", np.zeros(RATE, np.float32), RATE)
    nan = _noise(0.5)
    nan[100] = np.nan
    soundfile.write(root / "nan.wav", nan, RATE, subtype="FLOAT")
    (root / "song.mid").write_bytes(b"MThd\x00\x00\x00\x06")                           # unsupported format
    soundfile.write(root / "lofi.wav", _noise(1.0, 4000), 4000)                         # below min_sample_rate
    soundfile.write(root / "uncaptioned.wav", _noise(1.0), RATE)
    (root / ".hidden").mkdir()
    soundfile.write(root / ".hidden" / "ignored.wav", _noise(0.2), RATE)                # hidden: not read
    lines = [json.dumps({"audio_path": "good.wav", "caption": "white noise", "split": "test", "extra": 1}),
             "{this is not json",
             json.dumps({"audio_path": "missing.wav", "caption": "gone"}),
             json.dumps({"audio_path": "stereo_44k.flac", "caption": "stereo noise", "split": "validation"}),
             json.dumps({"audio_path": "sub/deep.ogg", "caption": "deep noise"}),
             json.dumps({"audio_path": "silent.wav", "caption": "nothing"}),
             json.dumps({"audio_path": "nan.wav", "caption": "broken"}),
             json.dumps({"audio_path": "corrupt.wav", "caption": "broken"}),
             json.dumps({"audio_path": "zero.wav", "caption": "broken"}),
             json.dumps({"audio_path": "lofi.wav", "caption": "telephone"})]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return {"bad_caption_line": "captions.jsonl:2", "missing_file": "captions.jsonl:3",
            "unsupported_format": "song.mid", "undecodable": "corrupt.wav", "empty": "zero.wav",
            "silent": "silent.wav", "non_finite": "nan.wav", "low_sample_rate": "lofi.wav"}


def _read_and_decode(root, checks, report):
    records = captioned_audio.read_audio_folder(str(root), checks, report)
    return {r.id: (r, captioned_audio.decode_record(r, checks, report)) for r in records}


def test_skip_policy_counts_every_kind_of_bad_input(tmp_path):
    expected = _bad_folder(tmp_path)
    report = BadInputReport("skip", "test", log=None)
    decoded = _read_and_decode(tmp_path, AudioChecks(RATE), report)
    usable = {k: v for k, v in decoded.items() if v[1] is not None}
    assert sorted(usable) == ["good.wav", "stereo_44k.flac", "sub/deep.ogg", "uncaptioned.wav"]
    assert report.summary()["skipped"] == {reason: 1 for reason in expected}
    for reason, where in expected.items():
        assert where in report.summary()["examples"][reason][0]
    assert report.notes["downmixed"] == 1 and report.notes["resampled"] == 1  # the 44.1 kHz file
    assert report.notes["uncaptioned"] == 1
    good, stereo = usable["good.wav"], usable["stereo_44k.flac"]
    assert (good[0].split, good[0].caption) == ("test", "white noise")
    assert (stereo[0].split, stereo[0].caption) == ("validation", "stereo noise")
    assert usable["uncaptioned.wav"][0].split == "train" and usable["uncaptioned.wav"][0].caption == ""
    np.testing.assert_allclose(good[1], soundfile.read(tmp_path / "good.wav", dtype="float32")[0], atol=1e-4)
    assert stereo[1].shape == (RATE,) and stereo[1].dtype == np.float32  # 1 s of 44.1 kHz stereo -> 16 kHz mono


_ONE_BAD_INPUT = {  # reason -> (makes the bad input in a folder, what the error must name)
    "bad_caption_line": (lambda d: (d / "captions.jsonl").write_text(
        json.dumps({"audio_path": "good.wav", "caption": "ok"}) + "\n" + "{not json\n"), "captions.jsonl:2"),
    "missing_file": (lambda d: (d / "captions.jsonl").write_text(
        json.dumps({"audio_path": "gone.wav", "caption": "gone"}) + "\n"), "captions.jsonl:1"),
    "unsupported_format": (lambda d: (d / "song.mid").write_bytes(b"MThd"), "song.mid"),
    "undecodable": (lambda d: (d / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk"), "corrupt.wav"),
    "empty": (lambda d: (d / "zero.flac").write_bytes(b""), "zero.flac"),
    "silent": (lambda d: soundfile.write(d / "silent.wav", np.zeros(RATE, np.float32), RATE), "silent.wav"),
    "non_finite": (lambda d: soundfile.write(d / "nan.wav", np.full(100, np.nan, np.float32), RATE,
                                             subtype="FLOAT"), "nan.wav"),
    "low_sample_rate": (lambda d: soundfile.write(d / "lofi.wav", _noise(1.0, 4000), 4000), "lofi.wav"),
}


@pytest.mark.parametrize("reason", sorted(_ONE_BAD_INPUT))
def test_error_policy_names_the_file_and_line(tmp_path, reason):
    soundfile.write(tmp_path / "good.wav", _noise(1.0), RATE)
    make, where = _ONE_BAD_INPUT[reason]
    make(tmp_path)
    checks = AudioChecks(RATE, bad_input="error")
    with pytest.raises(BadInputError, match=rf"/{where}: .*\[{reason}\]"):
        _read_and_decode(tmp_path, checks, BadInputReport("error", "test", log=None))
    report = BadInputReport("skip", "test", log=None)  # the same folder under 'skip': one counted skip
    decoded = _read_and_decode(tmp_path, AudioChecks(RATE), report)
    assert report.summary()["skipped"] == {reason: 1}
    assert decoded["good.wav"][1] is not None


def test_missing_caption_where_required(tmp_path):
    _bad_folder(tmp_path)
    report = BadInputReport("skip", "test", log=None)
    records = captioned_audio.read_audio_folder(str(tmp_path), AudioChecks(RATE, require_captions=True), report)
    assert "uncaptioned.wav" not in [r.id for r in records] and report.skipped["no_caption"] == 1
    strict_folder = tmp_path / "strict"
    strict_folder.mkdir()
    soundfile.write(strict_folder / "captioned.wav", _noise(0.5), RATE)
    soundfile.write(strict_folder / "uncaptioned.wav", _noise(0.5), RATE)
    (strict_folder / "captions.jsonl").write_text(json.dumps({"audio_path": "captioned.wav", "caption": "x"}))
    with pytest.raises(BadInputError, match=r"uncaptioned.wav: no caption.*\[no_caption\]"):
        captioned_audio.read_audio_folder(str(strict_folder), AudioChecks(RATE, "error", require_captions=True),
                                          BadInputReport("error", "test", log=None))


def test_bad_settings_and_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="bad_input='drop'"):
        AudioChecks(RATE, bad_input="drop")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        captioned_audio.read_audio_folder(str(tmp_path / "nope"), AudioChecks(RATE), BadInputReport("skip", "t"))
    (tmp_path / "a.mid").write_bytes(b"x")
    with pytest.raises(ValueError, match="no decodable audio files"):
        captioned_audio.scan_audio_folder(str(tmp_path), RATE)


def _musiccaps(root):
    clips = root / "clips"
    clips.mkdir()
    rows = [("aaa", "False", "['piano', 'calm']", "A calm piano."),
            ("bbb", "True", "['drums']", "Loud drums."),
            ("ccc", "False", "['gone']", "A deleted video."),         # no clip
            ("ddd", "maybe", "['x']", "Bad flag."),                    # bad row
            ("eee", "False", "not a list", "Bad aspects.")]           # bad row
    with open(root / "musiccaps-public.csv", "w") as f:
        f.write("ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,"
                "is_audioset_eval\n")
        for ytid, eval_flag, aspects, caption in rows:
            f.write(f'{ytid},30,40,"/m/x","{aspects}","{caption}",1,False,{eval_flag}\n')
    for ytid in ("aaa", "bbb", "ddd", "eee"):
        soundfile.write(clips / f"{ytid}.wav", _noise(10.0, seed=len(ytid)), RATE)
    return root / "musiccaps-public.csv", clips


def test_musiccaps_rows_splits_aspects_and_missing_clips(tmp_path):
    csv_path, clips = _musiccaps(tmp_path)
    report = BadInputReport("skip", "test", log=None)
    records = captioned_audio.read_musiccaps(str(csv_path), str(clips), AudioChecks(RATE), report)
    assert [(r.id, r.split, r.aspects, r.caption) for r in records] == [
        ("aaa", "train", ("piano", "calm"), "A calm piano."), ("bbb", "test", ("drums",), "Loud drums.")]
    assert report.summary()["skipped"] == {"bad_csv_row": 2, "missing_clip": 1}
    # Missing clips are skipped even under 'error' (deleted videos are expected); bad rows are errors.
    strict = BadInputReport("error", "test", log=None)
    with pytest.raises(BadInputError, match=r"musiccaps-public.csv:5: bad row.*\[bad_csv_row\]"):
        captioned_audio.read_musiccaps(str(csv_path), str(clips), AudioChecks(RATE, "error"), strict)
    assert strict.skipped["missing_clip"] == 1
    (tmp_path / "bad.csv").write_text("ytid,caption\nx,y\n")
    with pytest.raises(ValueError, match="missing columns"):
        captioned_audio.read_musiccaps(str(tmp_path / "bad.csv"), str(clips), AudioChecks(RATE), report)


def _train_records(ids, split="train"):
    return [captioned_audio.AudioRecord(path=f"/music/{i}", id=i, split=split) for i in ids]


def _position(record_id):
    """The carve's position, computed here from its definition (SHA-1 of the id, first 13 hex digits)."""
    return int(hashlib.sha1(record_id.encode()).hexdigest()[:13], 16) / 16.0 ** 13


def test_held_out_carve_follows_the_hash_and_is_stable_when_files_are_added():
    carve = captioned_audio.HeldOutCarve(validation_fraction=0.1, test_fraction=0.05)
    ids = [f"album_{i // 10}/track_{i:03d}.flac" for i in range(300)]
    report = BadInputReport("skip", "folder", log=None)
    carved = {r.id: r.split for r in captioned_audio.carve_held_out(_train_records(ids), carve, report)}
    want = {i: "validation" if _position(i) < 0.1 else "test" if _position(i) < 0.15 else "train" for i in ids}
    assert carved == want
    counts = {s: sum(1 for v in carved.values() if v == s) for s in ("train", "validation", "test")}
    assert 15 <= counts["validation"] <= 45 and 5 <= counts["test"] <= 25 and sum(counts.values()) == 300
    assert report.notes == {"carved_validation": counts["validation"], "carved_test": counts["test"]}
    # 200 more files: every earlier file keeps its split (a held-out file never moves into training).
    more = ids + [f"new/track_{i:03d}.wav" for i in range(200)]
    again = {r.id: r.split for r in captioned_audio.carve_held_out(
        _train_records(more), carve, BadInputReport("skip", "folder", log=None))}
    assert {i: again[i] for i in ids} == carved
    # Splits the source has are kept; only the missing one is carved, from 'train' rows only.
    given = _train_records(ids[:100]) + _train_records([f"v{i}" for i in range(5)], "validation")
    partial = captioned_audio.carve_held_out(given, carve, BadInputReport("skip", "folder", log=None))
    assert [r.split for r in partial[100:]] == ["validation"] * 5
    assert {r.split for r in partial[:100]} == {"train", "test"}
    assert {r.id for r in partial if r.split == "test"} == {i for i in ids[:100] if 0.1 <= _position(i) < 0.15}


def test_held_out_carve_of_few_files_takes_one_each_or_says_there_is_nothing(capsys):
    carve = captioned_audio.HeldOutCarve()  # 5% / 5%, at least 10 training files
    ids = [f"f{i}.wav" for i in range(10)]
    report = BadInputReport("skip", "tiny folder", log=sys.stderr)  # stderr as captured now
    carved = captioned_audio.carve_held_out(_train_records(ids), carve, report)
    # The rule, written out: the split's interval, or else the lowest remaining position.
    order = sorted(ids, key=_position)
    validation = [i for i in order if _position(i) < 0.05] or order[:1]
    rest = [i for i in order if i not in validation]
    test = [i for i in rest if 0.05 <= _position(i) < 0.10] or rest[:1]
    assert {r.id: r.split for r in carved} == {i: "validation" if i in validation else "test" if i in test
                                               else "train" for i in ids}
    assert (f"carved {len(validation)} validation, {len(test)} test of 10 training files"
            in capsys.readouterr().err)
    three = BadInputReport("skip", "three files", log=sys.stderr)
    assert [r.split for r in captioned_audio.carve_held_out(_train_records(ids[:3]), carve, three)] == ["train"] * 3
    assert three.notes == {"no_held_out": 1}
    assert "fewer than HeldOutCarve.min_files=10: nothing is held out" in capsys.readouterr().err
    for bad, message in (({"validation_fraction": 0.5}, "validation_fraction=0.5"),
                         ({"validation_fraction": 0.3, "test_fraction": 0.3}, "less than half"),
                         ({"min_files": 2}, "min_files=2")):
        with pytest.raises(ValueError, match=message):
            captioned_audio.HeldOutCarve(**bad)
