"""The recipe (`python -m musiclm_jax.recipe`) on a folder of real-format files: mixed sample rates and formats,
stereo, bad files, and captions without a `split` field. The whole chain runs at tiny size with a few steps per
job (`--bind`), in this process (`--in_process`); quality.json holds the held-out measures and the data counts."""
import json
import os

import numpy as np
import pytest
import soundfile

from musiclm_jax import recipe
from musiclm_jax.data import audio_io, synthetic_music

FILES = 27  # named so that the hash carve holds out 1 validation and 2 test files
TRAINED = ("codec", "w2v_bert", "mulan", "semantic_stage", "coarse_stage", "fine_stage")
FAST = [f"{step}:{binding}" for step in TRAINED for binding in ("TRAIN_STEPS=3", "WARMUP_STEPS=1")]
FAST += [f"{step}:train_lib.train.eval_period=0" for step in ("codec", "w2v_bert", "mulan")]
FAST += ["semantic_tokens:fit_semantic.fit_semantic_tokenizer.num_steps=2", "mulan_rvq:fit_rvq.fit_rvq.steps=2",
         "mulan_rvq:fit_rvq.fit_rvq.num_clips=64",
         "eval_generation:MAX_EXAMPLES=4", "eval_generation:BATCH_SIZE=2"]


def _folder(root) -> dict:
    """FILES synthetic pieces written as a user's folder would hold them, plus bad files; captions.jsonl rows
    carry no split. Returns what was written."""
    root.mkdir()
    rates = (16000, 22050, 44100, 48000)
    rows = []
    for i in range(FILES):
        clip = synthetic_music.generate_clip(i, seed=7, seconds=8.5, sample_rate=24000)  # two MuLan windows
        rate = rates[i % len(rates)]
        audio = audio_io.resample(clip["audio"], 24000, rate)
        if i % 3 == 0:  # stereo, the channels slightly different
            audio = np.stack([audio, 0.8 * audio], axis=1)
        name = f"track_{i:02d}.{'flac' if i % 5 == 0 else 'wav'}"
        soundfile.write(str(root / name), audio, rate)
        rows.append({"audio_path": name, "caption": clip["caption"]})
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("not audio")
    soundfile.write(str(root / "silence.wav"), np.zeros(5 * 16000, np.float32), 16000)
    rows += [{"audio_path": n, "caption": "a broken file"} for n in ("empty.wav", "notes.wav", "silence.wav")]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": rows}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    _folder(root / "music")
    out = root / "out"
    result = recipe.main(["--output_dir", str(out), "--audio_dir", str(root / "music"), "--in_process"]
                         + [f"--bind={b}" for b in FAST])
    return out, result


def test_the_recipe_runs_on_a_real_format_folder_and_reports(recipe_run):
    out, result = recipe_run
    quality = json.loads((out / "quality.json").read_text())
    assert quality == result["quality"]
    assert [name for name, _ in recipe.folder_steps(str(out), recipe.DataSource("audio_dir", "/x"))] == list(
        json.loads((out / "quality.json").read_text())["timings"])[:-1]
    # The held-out measures of the three evaluations, on the 2 carved test clips.
    assert {"si_snr_db", "mel_distance", "pitch_class_agreement", "bitrate_kbps"} <= set(quality["codec"])
    assert {"text_to_audio_recall_at_1", "audio_to_text_recall_at_1"} <= set(quality["mulan"])
    assert {"fad_mulan", "kld_mulan_zero_shot", "mulan_cycle_consistency"} <= set(quality["generation"])
    assert quality["codec"]["num_examples"] == quality["mulan"]["num_examples"] == 2
    # The data counts of every prepared dataset (one per sample rate the jobs read at): the 3 bad files skipped
    # by reason, 9 stereo files downmixed, and validation and test carved from rows without a split.
    assert len(quality["data"]) >= 2, quality["data"]
    for name, metadata in quality["data"].items():
        assert metadata["bad_input"]["skipped"] == {"empty": 1, "silent": 1, "undecodable": 1}, name
        notes = metadata["bad_input"]["notes"]
        assert notes["carved_validation"] == 1 and notes["carved_test"] == 2 and notes["downmixed"] == 9, name
        # Records before decoding: the 27 pieces and the 3 bad files, 3 of them carved out of train.
        assert metadata["held_out"]["records"] == {"train": FILES + 3 - 3, "validation": 1, "test": 2}, name
    assert (out / "eval" / "generation" / "report.html").is_file()


def test_a_second_run_skips_every_step_and_redo_starts_one_over(recipe_run, capsys):
    out, _ = recipe_run
    steps = len(recipe.folder_steps(str(out), recipe.DataSource("a", "b")))
    recipe.main(["--output_dir", str(out), "--audio_dir", str(out.parent / "music"), "--in_process"])
    assert capsys.readouterr().out.count("done earlier, skipped") == steps
    # --redo mulan_rvq: that step's output is removed and made again; every other step is skipped.
    rvq = out / "mulan" / "mulan_rvq.npz"
    before = rvq.stat().st_mtime_ns
    recipe.main(["--output_dir", str(out), "--audio_dir", str(out.parent / "music"), "--in_process",
                 "--redo", "mulan_rvq"] + [f"--bind={b}" for b in FAST if b.startswith("mulan_rvq:")])
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == steps - 1 and "[5/" in printed
    assert rvq.stat().st_mtime_ns > before and (out / ".done" / "mulan_rvq").is_file()


def test_local_runs_a_training_step_as_several_processes(recipe_run, capsys):
    """--local 2: the step runs through launch/tpu_run.sh as 2 processes of 4 CPU devices (jax.distributed over
    loopback), each with its own log, process 0's echoed; the evaluations stay in one process."""
    out, _ = recipe_run
    recipe.main(["--output_dir", str(out), "--audio_dir", str(out.parent / "music"), "--redo", "semantic_stage",
                 "--local", "2", "--local_devices", "4"] + [f"--bind={b}" for b in FAST if b.startswith("semantic_")])
    printed = capsys.readouterr().out
    assert "launch/tpu_run.sh --local 2 --local_devices 4 --log_dir" in printed
    assert "[semantic_stage 0/2] step 3/3" in printed
    logs = out / "logs" / "semantic_stage"
    assert sorted(p.name for p in logs.iterdir()) == ["process-0.log", "process-1.log"]
    assert "processes finished" in (out / "logs" / "semantic_stage.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "semantic" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    with pytest.raises(SystemExit, match="--in_process and --local exclude each other"):
        recipe.main(["--output_dir", str(out), "--audio_dir", str(out.parent / "music"), "--local", "2",
                     "--in_process"])
    with pytest.raises(SystemExit, match="--local_devices goes with --local"):
        recipe.main(["--output_dir", str(out), "--audio_dir", str(out.parent / "music"), "--local_devices", "2"])


def test_an_interrupted_training_step_resumes_from_its_checkpoint(tmp_path, capsys):
    """A step that stopped before finishing (no OUT/.done/<step>) runs again and resumes from its run
    directory's last checkpoint, as a restarted `train` does; the recipe never clears an unfinished step's
    output. The interruption is a run of the same command to step 2 of 4 outside the recipe."""
    model_dir = tmp_path / "out" / "codec"
    command = ["musiclm_jax.train", "--gin_file=gin/codec/spectral_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
               "--gin.BATCH_SIZE=8", "--gin.SEGMENT_SAMPLES=4800", "--gin.WARMUP_STEPS=1",
               "--gin.train_lib.train.checkpoint_period=2", "--gin.train_lib.train.eval_period=0"]
    recipe.run_step("codec", command + ["--gin.TRAIN_STEPS=2"], 1, 1, str(tmp_path / "first.log"), in_process=True)
    assert not (tmp_path / "out" / ".done" / "codec").exists()
    recipe.run_plan([("codec", command + ["--gin.TRAIN_STEPS=4"])], str(tmp_path / "out"), in_process=True)
    assert f"train: resumed from step 2 in {model_dir}" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and (tmp_path / "out" / ".done" / "codec").is_file()


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match="captions.jsonl is missing"):
        (tmp_path / "music").mkdir()
        recipe.main(["--output_dir", str(tmp_path / "out"), "--audio_dir", str(tmp_path / "music")])
    (tmp_path / "music" / "captions.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no command step 'fine'"):
        recipe.main(["--output_dir", str(tmp_path / "out"), "--audio_dir", str(tmp_path / "music"),
                     "--bind", "fine:TRAIN_STEPS=2"])
    with pytest.raises(SystemExit, match="expected STEP:NAME=VALUE"):
        recipe.main(["--output_dir", str(tmp_path / "out"), "--audio_dir", str(tmp_path / "music"),
                     "--bind", "fine_stage"])
    with pytest.raises(SystemExit, match="is not a directory"):
        recipe.main(["--output_dir", str(tmp_path / "out"), "--musiccaps_dir", str(tmp_path / "none")])


def test_init_from_fine_tunes_a_training_step_from_a_run_directory(tmp_path):
    """--init_from STEP=DIR binds INIT_CHECKPOINT (train's t5x-style fine-tuning, tested in test_train_cli) on that
    training step only; a step that does not train, a missing directory and a malformed argument are named."""
    (tmp_path / "music").mkdir()
    (tmp_path / "prior").mkdir()
    plan = recipe.folder_steps(str(tmp_path / "out"), recipe.DataSource("audio_dir", str(tmp_path / "music")))
    plan = recipe.apply_bindings(plan, recipe.init_from_bindings(plan, [f"coarse_stage={tmp_path / 'prior'}"]))
    binding = f"--gin.INIT_CHECKPOINT='{tmp_path / 'prior'}'"
    assert [name for name, argv in plan if isinstance(argv, list) and binding in argv] == ["coarse_stage"]
    for item, error in ((f"tokenize={tmp_path}", "not a training step"),
                        (f"fine_stage={tmp_path / 'none'}", "not a run directory"), ("fine_stage", "expected STEP=DIR")):
        with pytest.raises(SystemExit, match=error):
            recipe.init_from_bindings(plan, [item])


def test_an_evaluation_that_cannot_run_is_stated_and_the_rest_goes_on(tmp_path, capsys):
    def too_few(out):
        raise ValueError("MuLan evaluation needs at least 2 captioned clips in split 'test'; found 1")
    ran = []
    plan = [("eval_mulan", too_few), ("report", lambda out: ran.append("report"))]
    recipe.run_plan(plan, str(tmp_path))
    assert ran == ["report"]
    marker = json.loads((tmp_path / ".done" / "eval_mulan").read_text())
    assert "found 1" in marker["failed"] and "goes on without it" in capsys.readouterr().out
    with pytest.raises(ValueError, match="boom"):  # any other step stops the recipe
        recipe.run_plan([("tokenize", lambda out: (_ for _ in ()).throw(ValueError("boom")))], str(tmp_path))


def test_the_paper_pod_plan_prints_each_step_through_tpu_run_with_valid_gin(tmp_path, capsys):
    """`--size paper --dry-run --tpu --zone` on gs:// paths: each step is a launch/tpu_run.sh command of the paper's
    gin files whose bindings parse (every REQUIRED macro set), after the steps it waits for; launch/tpu_run.sh takes
    each command (its own --dry-run, against a stand-in gcloud that must not be called) and would run the step's
    python command on every worker."""
    import shlex
    import subprocess
    import sys

    import gin

    from musiclm_jax import gin_utils
    result = recipe.main(["--output_dir", "gs://bkt/run", "--audio_dir", "gs://bkt/music", "--size", "paper",
                          "--dry-run", "--tpu", "my-pod", "--zone", "us-central2-b", "--topology", "v5e:16x16"])
    printed = capsys.readouterr().out
    assert "topology v5e:16x16: 256 chips, 64 workers; outputs under gs://bkt/run" in printed
    assert "# [7/13] semantic_stage after tokenize (reads gs://bkt/run/tokens)" in printed
    assert "# [6/13] tokenize after codec, semantic_tokens, mulan_rvq (reads gs://bkt/run/codec, " in printed
    assert "single-process" not in printed  # the data jobs run on every worker too
    commands = [line for line in printed.splitlines() if line.startswith("bash launch/tpu_run.sh")]
    plan = [(name, argv) for name, argv in result["plan"] if isinstance(argv, list)]
    assert len(commands) == len(plan) == 12
    gin_files = {name: next((a for a in argv if a.startswith("--gin_file=")), None) for name, argv in plan}
    assert gin_files["codec"] == "--gin_file=gin/codec/spectral_paper.gin"
    assert gin_files["semantic_stage"] == "--gin_file=gin/stages/semantic_melody_paper.gin"
    assert gin_files["coarse_stage"] == "--gin_file=gin/stages/coarse_melody_paper.gin"
    assert gin_files["fine_stage"] == "--gin_file=gin/stages/fine_paper.gin"
    for name, argv in plan:
        args = argv[1:]
        if name == "mulan_rvq":
            assert "--gin_file=gin/mulan/rvq_paper.gin" in args and "--gin.AUDIO_DIR='gs://bkt/music'" in args
        assert not any(a.startswith("--gin.TRAIN_STEPS") for a in args)  # the gin files' own schedules
        __import__(argv[0])
        flags = gin_utils.parse_flags(args, None)
        try:
            gin_utils.parse_gin(flags["gin_files"], flags["gin_bindings"], finalize=True)
        finally:
            gin.clear_config()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nopen({str(marker)!r}, 'w').close()\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for line, (name, argv) in zip(commands, plan):
        words = shlex.split(line)
        assert words[:2] == ["bash", "launch/tpu_run.sh"] and words[words.index("--") + 1:] == ["python", "-m", *argv]
        proc = subprocess.run(words[:2] + ["--dry-run"] + words[2:], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        run = [w for w in proc.stdout.splitlines() if " ssh my-pod " in w][-1]
        assert "--worker=all" in run and "--zone=us-central2-b" in run and f"logs/recipe/{name}" in run
        remote = next(w for w in shlex.split(run[2:]) if w.startswith("--command="))
        step_command = remote[remote.index("{ ") + 2:remote.index(" ; }")]
        assert shlex.split(step_command) == ["python", "-m", *argv], run  # what each worker's bash runs
    assert not marker.exists()


def test_pod_plans_are_printed_not_run_and_their_flags_are_checked(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    (music / "captions.jsonl").write_text("")
    base = ["--output_dir", str(tmp_path / "out"), "--audio_dir", str(music)]
    with pytest.raises(SystemExit, match="printed with --dry-run, not run"):
        recipe.main(base + ["--size", "paper"])
    with pytest.raises(SystemExit, match="--tpu needs --zone"):
        recipe.main(base + ["--tpu", "x", "--dry-run"])
    with pytest.raises(SystemExit, match="--topology 'v5e': expected KIND:AxB"):
        recipe.main(base + ["--size", "paper", "--tpu", "x", "--zone", "z", "--topology", "v5e", "--dry-run"])
    assert recipe.slice_workers("v5e:2x4") == (8, 1) and recipe.slice_workers("v4:2x2x2") == (8, 2)
    result = recipe.main(base + ["--dry-run", "--local", "2"])  # tiny, as 2 local processes
    assert len(result["plan"]) == 13


@pytest.mark.parametrize("step", ["codec", "w2v_bert", "mulan", "semantic_stage", "coarse_stage", "fine_stage"])
def test_each_training_step_of_a_plan_compiles_for_the_slice_it_names(step, tmp_path):
    """`--dry-run --aot`'s check at tiny size on a small slice: the step's own gin files and bindings (data and
    token directories on gs://, never read; a stage's layout and lengths from the planned tiny token cache)
    AOT-compile for v5e:2x2 and fit (aot.py's report)."""
    source = recipe.DataSource("audio_dir", "gs://bkt/music")
    plan = recipe.folder_steps("gs://bkt/run", source)
    report = recipe.aot_report(plan, step, "v5e:2x2")
    assert report["num_chips"] == 4 and report["fits"] and report["params"] > 0, report


def test_the_recipe_runs_on_a_musiccaps_folder(tmp_path):
    """--musiccaps_dir: musiccaps-public.csv and the clips {ytid}.<ext> (MusicCaps' layout, built here): 24
    training rows, 4 is_audioset_eval rows (the test split) and one row whose clip is missing (counted). The
    chain runs end to end at tiny size and the held-out measures are on the eval rows."""
    mc = tmp_path / "musiccaps"
    mc.mkdir()
    rows = ["ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,"
            "is_audioset_eval"]
    for i in range(29):
        clip = synthetic_music.generate_clip(i, seed=11, seconds=8.5, sample_rate=24000)
        rows.append(f"yt{i:03d},30,40,/m/0,\"['music']\",\"{clip['caption']}\",1,False,{i >= 24}")
        if i != 28:  # a deleted video: its row stays, its clip is missing
            soundfile.write(str(mc / f"yt{i:03d}.wav"), audio_io.resample(clip["audio"], 24000, 44100), 44100)
    (mc / "musiccaps-public.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = recipe.main(["--output_dir", str(out), "--musiccaps_dir", str(mc), "--in_process"]
                         + [f"--bind={b}" for b in FAST])
    quality = result["quality"]
    assert quality["codec"]["num_examples"] == quality["mulan"]["num_examples"] == 4, quality
    assert {"fad_mulan", "mulan_cycle_consistency"} <= set(quality["generation"])
    musiccaps = [m for name, m in quality["data"].items() if "musiccaps" in name]
    assert musiccaps and all(m["bad_input"]["skipped"] == {"missing_clip": 1} for m in musiccaps), quality["data"]
