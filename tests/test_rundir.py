"""store/rundir.py: one folder, one run (locks); output rules in words."""
import os

from tests.helpers import error_line, hold_lock, run_inprocess, try_evaluate


def test_a_second_run_into_a_locked_folder_is_refused(trained, tmp_path):
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".lock"
    with hold_lock(lock):
        cfg = trained.write("locked.yaml", output_dir=str(tmp_path / "run"))
        line = error_line(run_inprocess("main.py", "--config", cfg, check=False))
    assert line == (f"error: output folder {str(tmp_path / 'run')!r} is in use by another run (process 4242 holds "
                    f"{lock}); wait for it or choose another folder")
    with hold_lock(tmp_path / ".res.lock"):
        line = error_line(try_evaluate(trained, tmp_path / "res"))
    assert line == (f"error: output folder {str(tmp_path / 'res')!r} is in use by another run (process 4242 "
                    f"holds {tmp_path / '.res.lock'}); wait for it or choose another folder")


def test_causes_and_output_problems_are_said_in_words(tmp_path):
    import errno

    from store.rundir import cause, output_file_problem, outputs_problem
    assert cause(OSError(errno.ENOSPC, "whatever the system says")) == "no space left on device"
    assert cause(OSError(errno.EACCES, "Permission denied")) == "permission denied"
    assert cause(OSError()) == "oserror"
    (tmp_path / "f").write_text("x")
    problem = output_file_problem(str(tmp_path / "f" / "out.csv"), "--output")
    assert problem == f"the folder of --output {str(tmp_path / 'f')!r} is a file, not a folder"
    assert output_file_problem(str(tmp_path / "new" / "out.csv"), "--output") is None and (tmp_path / "new").is_dir()
    assert "is a folder; name a file in it instead" in output_file_problem(str(tmp_path), "--output")
    assert "is a folder" in output_file_problem(str(tmp_path / "a.csv"), "--output", str(tmp_path / "new"))
    a, also_a = str(tmp_path / "a.csv"), f"{tmp_path}/./a.csv"
    problem = outputs_problem({"--output": a, "its summary": also_a}, [], lambda what, path: True)
    assert problem == f"its summary {also_a!r} and --output {a!r} are the same file; choose another name"
    assert outputs_problem({"--output": a, "its summary": str(tmp_path / "a.json")}, [], lambda w, p: True) is None
    (tmp_path / "img.png").write_bytes(b"an input")
    os.link(tmp_path / "img.png", tmp_path / "hard.png")
    inputs = [str(tmp_path / "x.png"), str(tmp_path / "img.png")]
    problem = outputs_problem({"--output": str(tmp_path / "hard.png")}, inputs, lambda w, p: True)
    assert problem == (f"--output {str(tmp_path / 'hard.png')!r} is one of the inputs ({str(tmp_path / 'img.png')!r}); "
                       f"writing it would replace that file")
    (tmp_path / "notes.csv").write_text("mine")
    mine = {"--output": str(tmp_path / "notes.csv")}
    assert "exists and was not written by this script" in outputs_problem(mine, [], lambda w, p: False)
    assert outputs_problem(mine, [str(tmp_path / "img.png")], lambda w, p: w == "--output") is None  # ours: replaced


def test_a_keyed_file_is_named_by_its_key_whatever_order_the_key_was_built_in():
    """Cache files and calibration records are found by their key's digest: the same key built in
    another order (another code path, a key read back from JSON) must name the same file."""
    import hashlib

    from store.rundir import keyed_path
    a = keyed_path("/c", "digits-test", {"split": "test", "n": 5, "backbone": {"name": "x", "size": 32}}, ".pt")
    b = keyed_path("/c", "digits-test", {"backbone": {"size": 32, "name": "x"}, "n": 5, "split": "test"}, ".pt")
    assert a == b
    digest = hashlib.sha256(b'{"backbone": {"name": "x", "size": 32}, "n": 5, "split": "test"}').hexdigest()[:20]
    assert a == os.path.join("/c", f"digits-test-{digest}.pt")  # files stored by earlier versions are found
    assert keyed_path("/c", "digits-test", {"split": "train", "n": 5, "backbone": {"name": "x", "size": 32}}, ".pt") != a
