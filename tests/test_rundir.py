"""store/rundir.py: one folder, one run (locks)."""

from tests.helpers import error_line, hold_lock, run_inprocess, try_evaluate


def test_a_second_run_into_a_locked_folder_is_refused(trained, tmp_path):
    (tmp_path / "run").mkdir()
    holder = hold_lock(tmp_path / "run" / ".lock")
    try:
        cfg = trained.write("locked.yaml", output_dir=str(tmp_path / "run"))
        line = error_line(run_inprocess("main.py", "--config", cfg, check=False))
        assert "in use by another run" in line and "4242" in line
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(tmp_path / ".res.lock")
    try:
        assert "in use by another run" in error_line(try_evaluate(trained, tmp_path / "res"))
    finally:
        holder.kill()
        holder.wait()
