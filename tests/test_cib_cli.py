"""The example's command line refuses bad input in one clear line (exit status 2, no traceback)."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn")
pytest.importorskip("tqdm")

from patchblend.examples.cib.__main__ import main  # noqa: E402
from patchblend.examples.cib.data import GT_NAME, T1_NAME, T2_NAME, InputError, find_cases, load_case  # noqa: E402


def save(path, arr):
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), np.eye(4)), str(path))


def two_point_case(folder, shape=(20, 20, 20), t2_shape=None, gt=True):
    os.makedirs(folder, exist_ok=True)
    r = np.random.default_rng(0)
    save(folder / T1_NAME, r.random(shape))
    save(folder / T2_NAME, r.random(t2_shape or shape))
    if gt:
        save(folder / GT_NAME, np.zeros(shape))
    return folder


def one_line_error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A width-2 checkpoint trained for 2 iterations."""
    from patchblend.examples.cib.data import load_cases
    from patchblend.examples.cib.phantom import PhantomConfig, write_phantom_set
    from patchblend.examples.cib.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ckpt")
    write_phantom_set(str(root / "data"), 1, 0, seed=5, config=PhantomConfig(downsample=4.0))
    cfg = TrainConfig(out=str(root / "run"), width=2, patch=16, batch_two=2, batch_single=0, stage1_iters=1,
                      stage2_iters=1, progress=False)
    return train(cfg, cases=load_cases(str(root / "data")), log=lambda *a: None), str(root / "data")


def test_missing_data_folder(capsys, tmp_path):
    one_line_error(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                   "is not an existing folder")
    one_line_error(capsys, ["calibrate", "--ckpt", "x.pt", "--data", str(tmp_path / "nope")], "is not an existing folder")


@pytest.mark.parametrize("content", [b"", b"this is not a nifti file", "truncated"])
def test_unreadable_nifti(capsys, tmp_path, content, checkpoint):
    ckpt, _ = checkpoint
    case = two_point_case(tmp_path / "data" / "c1")
    if content == "truncated":
        raw = gzip.compress(open(case / T2_NAME, "rb").read())[:200]
        content = raw
    with open(case / T2_NAME, "wb") as f:
        f.write(content)
    with pytest.raises(InputError, match="cannot read"):
        load_case(str(case))
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")],
                   "cannot read")


def test_time_points_of_different_shapes(capsys, tmp_path, checkpoint):
    ckpt, _ = checkpoint
    two_point_case(tmp_path / "data" / "c1", t2_shape=(20, 20, 21))
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")],
                   "image shapes differ")


def test_checkpoint_errors(capsys, tmp_path, checkpoint):
    ckpt, data = checkpoint
    args = ["--data", data, "--out", str(tmp_path / "e")]
    one_line_error(capsys, ["evaluate", "--ckpt", str(tmp_path / "missing.pt"), *args], "does not exist")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    one_line_error(capsys, ["evaluate", "--ckpt", str(tmp_path / "other.pt"), *args], "is not a checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    one_line_error(capsys, ["evaluate", "--ckpt", str(tmp_path / "junk.pt"), *args], "cannot read checkpoint")
    run = os.path.dirname(ckpt)
    one_line_error(capsys, ["train", "--data", data, "--out", run, "--resume", "--width", "3", "--patch", "16",
                            "--no-progress"], "was trained with --width 2 (given 3)")


def test_bad_options(capsys, tmp_path, checkpoint):
    ckpt, data = checkpoint
    base = ["evaluate", "--ckpt", ckpt, "--data", data]
    one_line_error(capsys, base + ["--roi", "5"], "--roi must be a positive multiple of 16")
    one_line_error(capsys, base + ["--blendings", "bogus"], "unknown blending 'bogus'")
    one_line_error(capsys, base + ["--overlap", "1.5"], "--overlap must lie in [0, 1)")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, base + ["--out", str(tmp_path / "file")], "names an existing file")
    one_line_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "file")], "names an existing file")
    one_line_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "d"), "--preset", "easy"], "--preset must be")
    one_line_error(capsys, ["study", "--quick", "--out", str(tmp_path / "s"), "--seeds", "0,x"], "--seeds must be")


def test_missing_ground_truth_is_an_error_not_a_skip(capsys, tmp_path, checkpoint):
    ckpt, _ = checkpoint
    two_point_case(tmp_path / "data" / "c1")
    two_point_case(tmp_path / "data" / "c2", gt=False)
    save(tmp_path / "data" / "c2" / "ground_truth.nii", np.zeros((20, 20, 20)))
    os.makedirs(tmp_path / "data" / "notes")  # not a case folder: passed over
    with pytest.raises(InputError, match=r"c2 \(has ground_truth.nii\)"):
        find_cases(str(tmp_path / "data"))
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")],
                   "1 case folder(s)")


def test_no_traceback_from_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "patchblend.examples.cib", "evaluate", "--ckpt", str(tmp_path / "x.pt"),
                        "--data", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"evaluate: error: checkpoint {str(tmp_path / 'x.pt')!r} does not exist"], r.stderr


def test_calibrate_then_evaluate_with_posthoc_heads(capsys, tmp_path, checkpoint):
    import csv

    ckpt, data = checkpoint
    heads = str(tmp_path / "posthoc.pt")
    assert main(["calibrate", "--ckpt", ckpt, "--data", data, "--out", heads, "--epochs", "2"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--ckpt", ckpt, "--data", data, "--out", str(out), "--posthoc", heads, "--no-figure",
                 "--blendings", "average,aware-posthoc:grid,paper-posthoc:patch,oracle:grid"]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["heads"], r["blending"]) for r in rows] == [
        ("none", "average"), ("aware-posthoc", "grid"), ("paper-posthoc", "patch"), ("oracle", "grid")]
    with open(out / "head_quality.csv") as f:
        assert {r["heads"] for r in csv.DictReader(f)} == {"paper", "aware", "paper-posthoc", "aware-posthoc"}
    capsys.readouterr()
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", data, "--out", str(out), "--blendings",
                            "aware-posthoc:grid"], "needs the 'aware-posthoc' heads")
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", data, "--posthoc", ckpt], "is not a post-hoc heads file")


@pytest.mark.parametrize("extra, message", [
    (["--width", "0"], "--width must be an int >= 1, got 0"),
    (["--stage1-iters", "-1"], "--stage1-iters must be an int >= 0"),
    (["--batch-two", "0", "--batch-single", "0"], "--batch-two and --batch-single must sum to at least 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--grid", "0"], "--grid must be an int in [1, --patch]"),
    (["--grid", "17"], "--grid must be an int in [1, --patch] = [1, 16]"),
    (["--spacing", "0"], "--spacing (the voxel size to resample to, mm) must be a finite number > 0"),
    (["--device", "meta"], "--device 'meta' holds shapes without data"),
    (["--lesion-prob", "2"], "--lesion-prob must be a probability in [0, 1]"),
    # larger than the 4 mm phantom (about 38 x 47 x 40): refused after reading the cases, before the network
    # allocates anything (512 asked for about 24 GB and was killed)
    (["--patch", "512"], "--patch 512 is larger than every case"),
])
def test_bad_train_values(capsys, tmp_path, checkpoint, extra, message):
    _, data = checkpoint
    one_line_error(capsys, ["train", "--data", data, "--out", str(tmp_path / "run"), "--width", "2", "--patch", "16",
                            "--batch-two", "2", "--batch-single", "0", "--stage1-iters", "1", "--stage2-iters", "0",
                            "--no-progress", *extra], message)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_train_device_and_data(capsys, tmp_path, checkpoint):
    _, data = checkpoint
    base = ["train", "--out", str(tmp_path / "run"), "--patch", "16", "--no-progress"]
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, base + ["--data", str(tmp_path / "empty")], "holds no cases")
    if not torch.cuda.is_available():  # a CPU torch: torch's AssertionError before
        one_line_error(capsys, base + ["--data", data, "--device", "cuda"], "--device 'cuda' is not available here")


def test_bad_evaluate_calibrate_phantom_values(capsys, tmp_path, checkpoint):
    ckpt, data = checkpoint
    evaluate = ["evaluate", "--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "e")]
    for spacing in ("0", "-1", "nan"):
        one_line_error(capsys, evaluate + ["--spacing", spacing], "--spacing (the voxel size to resample to, mm)")
    one_line_error(capsys, evaluate + ["--roi", "0"], "--roi must be a positive multiple of 16")  # not the default
    one_line_error(capsys, evaluate + ["--device", "meta"], "--device 'meta'")
    calibrate = ["calibrate", "--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "h.pt")]
    one_line_error(capsys, calibrate + ["--epochs", "-1"], "--epochs must be an int >= 1")
    one_line_error(capsys, calibrate + ["--roi", "0"], "--roi must be a positive multiple of 16")
    one_line_error(capsys, ["phantom", "--out", str(tmp_path / "p"), "--downsample", "1e-6"],
                   "--downsample (the phantom voxel size, mm) must lie in [0.5, 10]")
    one_line_error(capsys, ["phantom", "--out", str(tmp_path / "p"), "--n-two", "-1"], "--n-two and --n-single")
    assert not (tmp_path / "p").exists() and not (tmp_path / "h.pt").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_flair_with_nan_or_inf_voxels_is_an_error(capsys, tmp_path, checkpoint, bad):
    """A FLAIR with NaN/inf voxels made the whole z-scored volume NaN: evaluate exited 0 with Dice 0 and no word.
    Now the case is refused, naming the file."""
    ckpt, _ = checkpoint
    case = two_point_case(tmp_path / "data" / "c1")
    flair = np.random.default_rng(1).random((20, 20, 20))
    flair[3, 4, 5] = bad
    save(case / T2_NAME, flair)
    with pytest.raises(InputError, match="holds 1 NaN or infinite voxel"):
        load_case(str(case))
    one_line_error(capsys, ["evaluate", "--ckpt", ckpt, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")],
                   f"{str(case / T2_NAME)!r} holds 1 NaN or infinite voxel(s)")
