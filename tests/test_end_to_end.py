"""The documented commands, run as written: the README's Python examples and `make demo` run twice."""
import os
import re
import subprocess

from tests.helpers import ROOT


def test_the_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The three Python examples of the README, in order, as a reader would paste them."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    (tmp_path / "config").symlink_to(os.path.join(ROOT, "config"))
    monkeypatch.chdir(tmp_path)  # the examples write into my_detector/ beside their config/
    namespace = {"__name__": "__main__"}
    for tag in ("api-example", "pytorch-ood-example", "knn-example"):
        code = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```", readme, re.S).group(1)
        exec(compile(code, f"README {tag}", "exec"), namespace)
    out = capsys.readouterr().out.strip().splitlines()
    flags = next(line for line in out if line.startswith("tensor([True"))
    assert "False" not in flags
    assert (tmp_path / "my_detector" / "checkpoint-last.pth").is_file()
    aurocs = {line.rsplit(" AUROC ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out if " AUROC " in line}
    assert set(aurocs) == {"DLSR", "kNN k=1", "Mahalanobis"}
    assert all(0.9 < v <= 1.0 for v in aurocs.values()), aurocs


def test_make_demo_trains_with_resume_auto_in_its_own_folder(tmp_path):
    """make demo, run again, continues (or reuses) its run: main.py --resume auto in $(DEMO)/checkpoint."""
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(["make", "-s", "--no-print-directory", "demo", "PY=echo", "FMNIST=/", f"DEMO={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0
    assert f"main.py --config config/demo.yaml --resume auto --output_dir {tmp_path}/checkpoint\n" in proc.stdout
    assert f"--pretrained_ldm_ckpt {tmp_path}/checkpoint/checkpoint-last.pth" in proc.stdout
