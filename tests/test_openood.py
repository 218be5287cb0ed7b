"""datasets/openood.py: OpenOOD v1.5's lists on a miniature root in the real layout, and openood.csv."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from datasets import build_dataset
from datasets.openood import MissingData, list_path
from dlsr.detector import DLSRDetector
from errors import UserError
from tests.helpers import run_inprocess


def _broken_root(oo, tmp_path, list_name, lines):
    root = tmp_path / "root"
    shutil.copytree(oo.root / "benchmark_imglist", root / "benchmark_imglist")
    (root / "images_classic").symlink_to(oo.root / "images_classic")
    (root / "benchmark_imglist" / "cifar10" / f"{list_name}.txt").write_text(lines)
    return root


def test_the_same_images_through_openood_and_folder_score_alike(oo, tmp_path):
    out = tmp_path / "r"
    root = oo.root / "images_classic"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", oo.ckpt_path, "--output_dir", str(out), "--no_plots",
                  "--ood", "tin_list=openood:cifar10/tin", "--ood", f"tin_folder=folder:{root / 'tin' / 'test'}",
                  "--ood", "svhn_list=openood:cifar10/svhn", "--ood", f"svhn_folder=folder:{root / 'svhn' / 'test'}",
                  "--dataset", f"folder:{root / 'cifar10' / 'test'}")
    for name in ("tin", "svhn"):
        a, b = (np.load(out / "scores" / f"{name}_{how}.npy") for how in ("list", "folder"))
        assert len(a) == len(oo.lists[f"test_{name}"]) and np.array_equal(a, b)  # lists in path order, as folders
    listed = build_dataset("openood:cifar10", "test", str(oo.root), 32).files
    folder = build_dataset(f"folder:{root / 'cifar10' / 'test'}", "test", str(oo.root), 32).files
    order = [listed.index(f) for f in folder]
    ours = np.load(oo.res / "scores" / "ID.npy")["MFsim"][order]  # openood:cifar10, test split
    assert np.allclose(np.load(out / "scores" / "ID.npy")["MFsim"], ours, rtol=1e-5, atol=1e-6)


def test_openood_csv_rows_columns_and_means(oo):
    from sklearn.metrics import auc, precision_recall_curve, roc_curve
    rows = list(csv.reader(open(oo.res / "openood.csv")))
    assert rows[0] == ["", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT"]
    names = [r[0] for r in rows[1:]]
    assert names == ["cifar100", "tin", "nearood", "mnist", "svhn", "texture", "places365", "farood"]
    table = {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}
    ids = np.load(oo.res / "scores" / "ID.npy")["MFsim"]
    for name in ("cifar100", "tin", "mnist", "svhn", "texture", "places365"):
        ood = np.load(oo.res / "scores" / f"{name}.npy")["MFsim"]
        label = np.r_[np.zeros(len(ids)), np.ones(len(ood))]  # OOD positive, as OpenOOD's evaluator
        conf = -np.r_[ids, ood]                                  # OpenOOD's confidence: higher = more ID
        fpr, tpr, _ = roc_curve(label, -conf)
        p_in, r_in, _ = precision_recall_curve(1 - label, conf)
        p_out, r_out, _ = precision_recall_curve(label, -conf)
        expected = 100 * np.array([fpr[np.argmax(tpr >= 0.95)], roc_auc_score(label, -conf), auc(r_in, p_in),
                                   auc(r_out, p_out)])
        assert np.allclose(table[name], expected, atol=1e-4), name
    assert np.allclose(table["nearood"], (table["cifar100"] + table["tin"]) / 2, atol=2e-4)
    far = [table[n] for n in ("mnist", "svhn", "texture", "places365")]
    assert np.allclose(table["farood"], np.mean(far, axis=0), atol=2e-4)
    auroc = json.loads((oo.res / "results.json").read_text())["metrics"]["MFsim"]["tin"]["AUROC"]
    assert table["tin"][1] == pytest.approx(100 * auroc, abs=1e-4)


def test_each_baseline_gets_its_own_openood_table(oo):
    rows = list(csv.reader(open(oo.res / "openood_kNN_k1.csv")))
    assert [r[0] for r in rows] == ["", "cifar100", "tin", "nearood", "mnist", "svhn", "texture", "places365",
                                    "farood"]
    assert rows[1] != list(csv.reader(open(oo.res / "openood.csv")))[1]  # the baseline's own scores
    assert not (oo.res / "openood_MSE.csv").exists()


def test_class_filters_and_the_val_split(oo):
    ds = build_dataset("openood:cifar10@0,1", "train", str(oo.root), 32)
    labels = [label for _, label in oo.lists["train_cifar10"]]
    assert len(ds) == sum(label in (0, 1) for label in labels)
    assert len(build_dataset("openood:cifar10", "val", str(oo.root), 32)) == 40
    assert len(build_dataset("openood:cifar10/val", "test", str(oo.root), 32)) == 30  # val_tin.txt
    from errors import UserError
    with pytest.raises(UserError, match="no validation split"):
        build_dataset("digits", "val", str(oo.root), 32)


@pytest.mark.parametrize("lines,says", [
    ("FIRST 0\ncifar10/test/0/9999.png 0\n", "test_cifar10.txt, line 2: the image .*9999.png does not exist"),
    ("/etc/passwd 0\n", "line 1: '/etc/passwd' is an absolute path"),
    ("../../etc/passwd 0\n", "line 1: '../../etc/passwd' leaves the image folder"),
    ("../outside.png 0\n", "line 1: '../outside.png' leaves the image folder"),
    ("\n\n", "test_cifar10.txt is empty"),
    ("FIRST zero\n", "line 1: expected 'relative/path label' with an integer label"),
    ("cifar10/../../../x.png 0\n", "line 1: 'cifar10/../../../x.png' leaves the image folder"),  # inside the path
    (" FIRST 0\n", "line 1: the line starts with whitespace"),
    ("  " + "x" * 60 + ".png 0\n", r"line 1: the line starts with whitespace \('  x{38}'\)"),  # its first 40 characters
    ("cifar10/test 0\n", "line 1: .*cifar10/test is a folder, not an image file"),
])
def test_a_bad_list_is_refused_in_one_line_before_any_extraction(oo, tmp_path, lines, says):
    root = _broken_root(oo, tmp_path, "test_cifar10", lines.replace("FIRST", oo.lists["test_cifar10"][0][0]))
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", oo.ckpt_path, "--data_path", str(root),
                         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and re.search(says, proc.stderr.strip().splitlines()[-1]), proc.stderr[-600:]
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_a_missing_root_or_list_names_the_path_and_the_download_script(oo, tmp_path):
    proc = run_inprocess("main.py", "--config", oo.config, "--data_path", str(tmp_path / "nowhere"),
                         "--output_dir", str(tmp_path / "o"), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "no OpenOOD data root at" in last and "download script" in last
    assert str(tmp_path / "nowhere" / "benchmark_imglist" / "cifar10") in last
    (tmp_path / "images").mkdir()  # a folder that is there, but not an OpenOOD root (no image lists in it)
    with pytest.raises(MissingData, match="no OpenOOD data root at .*images: expected .*images/benchmark_imglist/cifar10/"):
        list_path(str(tmp_path / "images"), "cifar10", None, "test")
    root = _broken_root(oo, tmp_path, "test_cifar10", "")
    os.remove(root / "benchmark_imglist" / "cifar10" / "test_svhn.txt")
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", oo.ckpt_path, "--data_path", str(root),
                         "--output_dir", str(tmp_path / "r"), "--dataset", "digits", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "test_svhn.txt" in last and "download script" in last


def test_pytorch_oods_openood_benchmark_gives_our_aurocs(oo, tmp_path, monkeypatch):
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.benchmark import CIFAR10_OpenOOD
    from torchvision.transforms import ToTensor

    hub = tmp_path / "torch_home" / "hub" / "openood_benchmark_imglist"
    shutil.copytree(oo.root / "benchmark_imglist", hub / "benchmark_imglist")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    bench = CIFAR10_OpenOOD(root=str(oo.root / "images_classic"), transform=ToTensor(), download=False)
    det = DLSRDetector.from_checkpoint(oo.ckpt_path, device="cpu")
    rows = {r["Dataset"]: r for r in bench.evaluate(det, loader_kwargs={"batch_size": 128})}
    ours = json.loads((oo.res / "results.json").read_text())["metrics"]["MFsim"]
    names = {"CIFAR100": "cifar100", "TinyImageNet": "tin", "MNIST": "mnist", "SVHN": "svhn", "Textures": "texture",
             "Places365": "places365"}
    assert set(rows) == set(names)
    for theirs, name in names.items():
        assert rows[theirs]["AUROC"] == pytest.approx(ours[name]["AUROC"], abs=0.0005), name


def test_malformed_openood_specs_are_refused_naming_the_forms():
    from datasets.openood import parse_spec
    assert parse_spec("cifar10") == ("cifar10", None) and parse_spec("cifar10/tin") == ("cifar10", "tin")
    assert parse_spec("cifar10/val") == ("cifar10", "val")
    for bad in ("", "/tin", "cifar10/", "cifar10/a/b"):
        with pytest.raises(UserError, match="expected openood:BENCH, openood:BENCH/SET or openood:BENCH/val"):
            parse_spec(bad)


def test_each_list_is_read_from_the_folder_openood_assigns(tmp_path):
    from datasets.openood import image_folder
    root = str(tmp_path)
    assert image_folder(root, "cifar10", None, "cifar10/x.png") == os.path.join(root, "images_classic")
    assert image_folder(root, "cifar100", "tin", "tin/x.png") == os.path.join(root, "images_classic")
    assert image_folder(root, "imagenet200", None, "imagenet_1k/x.JPEG") == os.path.join(root, "images_largescale")
    assert image_folder(root, "imagenet", "ninco", "ninco/x.jpg") == os.path.join(root, "images_largescale")
    assert image_folder(root, "imagenet200", "textures", "texture/x.jpg") == os.path.join(root, "images_classic")
    (tmp_path / "images_largescale" / "mine").mkdir(parents=True)
    (tmp_path / "images_largescale" / "mine" / "a.png").write_bytes(b"")
    assert image_folder(root, "mybench", "x", "mine/a.png") == os.path.join(root, "images_largescale")  # probed
    assert image_folder(root, "mybench", "x", "mine/b.png") == os.path.join(root, "images_classic")


def test_the_ood_validation_list_is_found_by_its_names_newest_first(tmp_path):
    from datasets.openood import ood_val_name
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for name in ("val_cifar10.txt", "val_cinic10.txt", "val_cifar100.txt"):
        (folder / name).write_text("")
    assert ood_val_name(str(folder), "cifar10") == "val_cifar100.txt"  # a release before v1.5
    (folder / "val_tin.txt").write_text("")
    assert ood_val_name(str(folder), "cifar10") == "val_tin.txt"  # v1.5's, when both are there
    mine = tmp_path / "mybench"
    mine.mkdir()
    (mine / "val_mybench.txt").write_text("")
    with pytest.raises(MissingData, match="expected one val_SET.txt besides val_BENCH.txt"):
        ood_val_name(str(mine), "mybench")
    (mine / "val_noise.txt").write_text("")
    assert ood_val_name(str(mine), "mybench") == "val_noise.txt"  # the one other list of a benchmark of one's own
    (mine / "val_more.txt").write_text("")
    with pytest.raises(MissingData, match="found val_more.txt, val_noise.txt"):
        ood_val_name(str(mine), "mybench")
    with pytest.raises(MissingData, match="no OOD validation list for imagenet200 .* expected val_openimage_o.txt"):
        ood_val_name(str(tmp_path / "imagenet200"), "imagenet200")


def test_a_list_with_a_byte_order_mark_reads_as_an_editor_reads_it(oo, tmp_path):
    first = oo.lists["test_cifar10"][0]
    root = _broken_root(oo, tmp_path, "test_cifar10", "")
    (root / "benchmark_imglist" / "cifar10" / "test_cifar10.txt").write_bytes(
        b"\xef\xbb\xbf" + f"{first[0]} {first[1]}\r\n".encode())
    ds = build_dataset("openood:cifar10", "test", str(root), 32)
    assert len(ds) == 1 and ds.files[0].endswith(first[0])


def test_the_last_class_of_an_id_list_can_be_selected(oo):
    """Labels 0..4 in the miniature's train list: @4 is its last class, not one past it."""
    ds = build_dataset("openood:cifar10@4", "train", str(oo.root), 32)
    assert len(ds) == sum(1 for _, label in oo.lists["train_cifar10"] if label == 4) > 0
    with pytest.raises(UserError, match="unknown class '5'"):
        build_dataset("openood:cifar10@5", "train", str(oo.root), 32)


def test_a_class_filter_on_a_list_without_classes_names_the_list(oo, tmp_path):
    root = _broken_root(oo, tmp_path, "test_cifar10", "")
    (root / "benchmark_imglist" / "cifar10" / "test_cifar10.txt").write_text(
        "".join(f"{rel} -1\n" for rel, _ in oo.lists["test_cifar10"][:3]))
    with pytest.raises(UserError, match=r"labels every image -1 \(no class\)") as e:
        build_dataset("openood:cifar10@0", "test", str(root), 32)
    assert "class subfolders" not in str(e.value)


def test_a_missing_set_keeps_its_row_and_its_groups_mean_is_left_empty(oo, tmp_path):
    root = _broken_root(oo, tmp_path, "test_cifar10", "".join(f"{r} {lab}\n" for r, lab in oo.lists["test_cifar10"]))
    os.remove(root / "benchmark_imglist" / "cifar10" / "test_texture.txt")
    out = tmp_path / "r"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", oo.ckpt_path, "--data_path", str(root), "--no_plots",
                  "--cache_dir", str(oo.cfg["cache_dir"]), "--output_dir", str(out), "--skip_missing")
    rows = {r[0]: r[1:] for r in csv.reader(open(out / "openood.csv"))}
    assert rows["texture"] == ["missing"] * 4  # the benchmark has it: its row stays, marked
    assert rows["farood"] == [""] * 4  # no mean of 3 of the 4 far sets passed for OpenOOD's figure
    assert all(float(v) >= 0 for v in rows["nearood"])  # the near group is whole
    res = {(r["score"], r["ood_set"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert res[("MFsim", "texture")]["AUROC"] == "missing" and res[("MFsim", "far mean")]["AUROC"] == "incomplete"
    assert "| **far mean** | incomplete (texture missing) |" in (out / "results.md").read_text()


@pytest.mark.parametrize("group", ["near", "far"])
def test_openood_csv_needs_both_groups(oo, tmp_path, group):
    """OpenOOD's table has near and far rows: sets grouped one way only get no openood.csv."""
    out = tmp_path / "r"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", oo.ckpt_path, "--no_plots", "--output_dir", str(out),
                  "--ood", "tin=openood:cifar10/tin", "--ood", "svhn=openood:cifar10/svhn",
                  "--opt", f"eval.groups={{tin: {group}, svhn: {group}}}")
    assert (out / "results.csv").is_file() and not (out / "openood.csv").exists()
