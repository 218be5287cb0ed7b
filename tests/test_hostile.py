"""A battery of hostile cases of our own (issue 29), on surfaces the issue's list does not name: others'
files given as checkpoints, flags combined in unusual ways, the API fed odd objects, the bench
scripts' arguments. Each ends in one clear line (exit 2) or
a ValueError in the user's terms, never a traceback or a silent wrong answer."""
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, run_inprocess, run_script


def last(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("odd")
    (tmp / "img.png").write_bytes(b"\x89PNG not really")
    torch.save(torch.zeros(3), tmp / "tensor.pth")
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "emptylist.txt").write_text("\n# nothing here\n")
    return tmp


CLI_CASES = {
    # name: (script, args (CKPT, CFG, TMP are replaced), the last line says)
    "a PNG as checkpoint": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "TMP/img.png"], "not a readable checkpoint"),
    "a bare tensor as checkpoint": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "TMP/tensor.pth"],
                                    "not a DLSR checkpoint"),
    "an empty file as checkpoint": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "TMP/empty.pth"], "an empty file"),
    "a folder as checkpoint": ("predict.py", ["--checkpoint", "TMP", "--images", "TMP/img.png"], "is a folder"),
    "results into the run's folder": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--output_dir",
                                                            "CKPTDIR"], "holds files that are not evaluation results"),
    "an OOD set of zero images": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--ood", "a=noise:gaussian:0"],
                                  "dataset 'noise:gaussian:0': the image count"),
    "k of 0": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--subset_timesteps_num", "0"], "must be in 1..99"),
    "eta above 1": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--eta", "2"], "diffusion.eta must be in"),
    "a group for no set": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--group", "zz=near"],
                           "eval.groups names 'zz'"),
    "no draws": ("test_mse_mfsim.py", ["--pretrained_ldm_ckpt", "CKPT", "--noise_draws", "0"], "must be positive"),
    "resume and overwrite": ("main.py", ["--config", "CFG", "--resume", "CKPT", "--overwrite"], "give one of them"),
    "resume and new weights": ("main.py", ["--config", "CFG", "--resume", "CKPT", "--pre_ckpt_path", "CKPT"],
                               "give one of them"),
    "resume a missing file": ("main.py", ["--config", "CFG", "--resume", "TMP/nope.pth"], "does not exist"),
    "a class out of range": ("main.py", ["--config", "CFG", "--dataset", "digits@11"], "unknown class '11'"),
    "an empty class list": ("main.py", ["--config", "CFG", "--dataset", "digits@"], "unknown class ''"),
    "an unknown --opt key": ("main.py", ["--config", "CFG", "--opt", "train.nonexistent=1"], "unknown config key"),
    "a log folder that is a file": ("main.py", ["--config", "CFG", "--log_dir", "TMP/img.png"], "is a file"),
    "zero epochs": ("main.py", ["--config", "CFG", "--epochs", "0"], "train.epochs must be positive"),
    "new weights that overwrite deletes": ("main.py", ["--config", "CFG", "--pre_ckpt_path", "CKPT", "--overwrite",
                                                       "--output_dir", "CKPTDIR"], "one of the checkpoints that"),
    "tpr of 1": ("predict.py", ["--checkpoint", "CKPT", "--images", "TMP/img.png", "--tpr", "1"], "exclusive"),
    "tpr NaN": ("predict.py", ["--checkpoint", "CKPT", "--images", "TMP/img.png", "--tpr", "nan"], "exclusive"),
    "an empty file list": ("predict.py", ["--checkpoint", "CKPT", "--images", "@TMP/emptylist.txt"],
                           "no image files found"),
    "a missing file list": ("predict.py", ["--checkpoint", "CKPT", "--images", "@TMP/nolist.txt"],
                            "cannot read the file list"),
    "a missing calibration folder": ("predict.py", ["--checkpoint", "CKPT", "--images", "TMP/img.png", "--calibration",
                                                    "folder:/nonexistent-dlsr"], "no folder at /nonexistent-dlsr"),
    "the CSV over the checkpoint": ("predict.py", ["--checkpoint", "CKPT", "--images", "TMP/img.png", "--output",
                                                   "CKPT"], "is one of the inputs"),
    "the CSV over the config": ("predict.py", ["--checkpoint", "CKPT", "--config", "CFG", "--images", "TMP/img.png",
                                               "--output", "CFG"], "is one of the inputs"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses_in_one_line_before_any_work(name, trained, odd_files, tmp_path):
    script, args, says = CLI_CASES[name]
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    swap = {"CKPTDIR": str(trained.ckpt), "CKPT": ckpt, "CFG": trained.config, "TMP": str(odd_files)}

    def fill(a):
        for k, v in swap.items():
            a = a.replace(k, v)
        return a
    args = [fill(a) for a in args]
    if script != "main.py" and "--output" not in args and "--output_dir" not in args:
        args += ["--output_dir" if script.startswith("test_") else "--output", str(tmp_path / "out.csv")]
    if script == "main.py" and "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "run")]
    before = {p: os.path.getmtime(p) for p in (ckpt, trained.config)}
    proc = run_inprocess(script, *args, check=False)
    assert proc.returncode == 2 and says in last(proc), proc.stderr[-800:]
    assert "Traceback" not in proc.stderr
    assert {p: os.path.getmtime(p) for p in before} == before  # no input touched


@pytest.fixture(scope="module")
def det(trained):
    from utils.detector import DLSRDetector
    return DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")


API_CASES = {
    "NaN floats": (lambda d: d.predict(torch.full((2, 3, 8, 8), float("nan"))), "NaN or inf"),
    "int16 images": (lambda d: d.predict(np.zeros((2, 8, 8), np.int16)), "must be uint8 .* got int16"),
    "bool images": (lambda d: d.predict(np.zeros((2, 8, 8), bool)), "got bool"),
    "a 1-D array": (lambda d: d.predict(np.zeros(8, np.uint8)), "cannot read images of shape \\(8,\\)"),
    "a 5-D array": (lambda d: d.predict(np.zeros((1, 1, 3, 8, 8), np.uint8)), "shape \\(1, 1, 3, 8, 8\\)"),
    "an empty batch": (lambda d: d.predict(np.zeros((0, 8, 8, 3), np.uint8)), "no images given"),
    "a missing file in a list": (lambda d: d.predict(["/nonexistent-dlsr.png"]), "cannot read the image file"),
    "a generator": (lambda d: d.predict(x for x in [np.zeros((8, 8), np.uint8)]), "from a generator"),
    "a 1-D feature vector": (lambda d: d.predict_features(torch.randn(512)), "got shape \\(512,\\)"),
    "tpr of 1 in calibrate": (lambda d: d.calibrate([np.zeros((5, 8, 8), np.uint8)], tpr=1.0), "exclusive"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_refuses_odd_inputs_in_the_users_terms(name, det):
    fn, says = API_CASES[name]
    with pytest.raises(ValueError, match=says):
        fn(det)


def test_api_device_names_are_checked(trained):
    from utils.detector import DLSRDetector, KNNDetector
    for device in ("tpu", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device=device)
    with pytest.raises(ValueError, match="device must be"):
        KNNDetector(trained.config).to("gpu")


def test_api_forms_that_are_fine_give_the_expected_counts(det, trained):
    from utils.detector import KNNDetector
    assert det.predict(np.zeros((1, 1), np.uint8)).shape == (1,)  # one 1 x 1 image
    assert det.predict([np.zeros((8, 8), np.uint8), np.zeros((16, 20, 3), np.uint8)]).shape == (2,)
    assert det.predict_features(np.random.randn(2, 512)).shape == (2,)  # float64 numpy
    knn = KNNDetector(trained.config, k=1, device="cpu").fit([(torch.rand(4, 1, 8, 8), torch.arange(4))])
    assert knn.predict(torch.rand(2, 1, 8, 8)).shape == (2,)


def test_benchmark_refuses_a_seed_given_twice():
    proc = run_script("bench/benchmark.py", "--seeds", "0", "0", check=False, timeout=120)
    assert proc.returncode == 2 and "a seed given twice" in proc.stderr


def test_benchmark_reads_the_baseline_names_of_its_own_first_seed():
    """A run with --seeds 1 2 read seed-0's results, which may be another run's or missing."""
    src = open(os.path.join(ROOT, "bench", "benchmark.py")).read()
    assert 'f"seed-{args.seeds[0]}"' in src and '"seed-0"' not in src


@pytest.mark.parametrize("only,says", [("abc", "expected SIZE:WIDTHxDEPTH:EPOCHS"),
                                       ("64:9x9:3", "unknown network '9x9'"),
                                       ("64:512x2:0", "expected SIZE:WIDTHxDEPTH:EPOCHS")])
def test_scale_study_checks_its_settings_before_training(only, says, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import scale_study
    assert says in scale_study.check_setting(only)
    assert scale_study.check_setting("64:512x2:20") is None

