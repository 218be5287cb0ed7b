"""submitit_train.py with submitit's local executor (the same job code as on Slurm, as processes here):
a 2-task gloo job interrupted mid-epoch (a preemption's SIGTERM, then the SIGUSR2 the executor sends
before its time limit) is requeued, trains to the end and ends with the uninterrupted run's weights;
a finished run submitted again does nothing; a failing job is not requeued."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from store.checkpoint import load_checkpoint
from tests.helpers import ROOT


pytest.importorskip("submitit")
EPOCHS = 8


def launch(t, out, *extra, tasks=2):
    """The launcher as a user runs it: 2 tasks on this machine, waited for."""
    cmd = [sys.executable, os.path.join(ROOT, "submitit_train.py"), "--cluster", "local", "--tasks_per_node", str(tasks),
           "--config", t.config, "--job_dir", str(t.tmp / f"{out.name}-jobs" / "%j"), "--output_dir", str(out), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=str(t.tmp), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tasks_of(out):
    """The job's task processes (python -m submitit.core._submit FOLDER), found by their job folder."""
    mark = f"{out.name}-jobs"
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "submitit.core._submit" in " ".join(p.info["cmdline"])
            and mark in " ".join(p.info["cmdline"])]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The settings of the jobs here, and the reference: the same run on two ranks, never interrupted
    (forked ranks with torchrun's variables: main.py's code as in a job's tasks, without a job)."""
    from tests.helpers import Tiny, run_forked_ranks
    t = Tiny(tmp_path_factory.mktemp("slurm"))
    t.config = t.write(train={"epochs": EPOCHS, "subset": 512, "batch_size": 32, "save_every": 100})
    t.reference = t.tmp / "reference"
    run_forked_ranks("main.py", [["--config", t.config, "--output_dir", str(t.reference)]] * 2)
    return t


@pytest.fixture(scope="module")
def interrupted(job):
    """A 2-task job interrupted twice: a preemption's SIGTERM inside epoch 2, then the SIGUSR2 that
    Slurm (and the local executor) sends before the time limit inside epoch 4 of the requeued job.
    Returns (its run folder, the launcher's stdout)."""
    out = job.tmp / "stopped"
    proc = launch(job, out)
    log, start = out / "log.txt", time.time()
    for sig, lines in ((signal.SIGTERM, 2), (signal.SIGUSR2, 5)):  # log lines: epochs, and one per requeue
        while not (log.is_file() and len(log.read_text().splitlines()) >= lines):
            assert proc.poll() is None and time.time() - start < 250, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        for task in tasks_of(out):  # Slurm signals every task of the job
            task.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "complete" in stdout, stderr[-3000:]
    return out, stdout


def test_an_interrupted_job_is_requeued_and_ends_with_the_weights_of_an_uninterrupted_one(job, interrupted):
    out, stdout = interrupted
    assert "submitted training job" in stdout
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    requeues = [line for line in lines if "requeue" in line]
    assert [r["requeue"] for r in requeues] == [1, 2]  # one line per requeue
    assert "SIGTERM received" in requeues[0]["reason"] and "SIGUSR2 received" in requeues[1]["reason"]
    assert [line["epoch"] for line in lines if "epoch" in line] == list(range(EPOCHS))  # each epoch once
    a, b = (load_checkpoint(str(folder / "checkpoint-last.pth")) for folder in (job.reference, out))
    assert b.run_id == requeues[0]["run_id"] == requeues[1]["run_id"] and b.epoch == EPOCHS - 1
    assert b.world_size == 2 and not b.in_progress
    for name, w in a.model.items():
        assert torch.equal(w, b.model[name]), name  # bit for bit
    assert all(torch.equal(a.ema["weights"][k], b.ema["weights"][k]) for k in a.ema["weights"])
    first_job = stdout.split("submitted training job ")[1].split(":")[0]
    assert (job.tmp / "stopped-jobs" / first_job / f"{first_job}_1_log.err").is_file()  # a log per task


def test_a_finished_run_submitted_again_is_not_submitted_and_a_job_that_finds_it_complete_does_nothing(
        job, interrupted, tmp_path, monkeypatch):
    out, _ = interrupted
    before = (out / "checkpoint-last.pth").stat().st_mtime_ns
    jobs = sorted(os.listdir(job.tmp / "stopped-jobs"))
    proc = launch(job, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stdout.startswith("nothing submitted: ") and "the run is complete" in stdout, \
        stderr[-3000:]
    assert sorted(os.listdir(job.tmp / "stopped-jobs")) == jobs  # no job
    # Not the same run (another effective batch, or more epochs asked): submitted, as a job decides it.
    from submitit_train import complete_run, training_config
    for flags in (["--batch_size", "16"], ["--epochs", str(EPOCHS + 1)]):
        _, cfg = training_config(["--config", job.config, "--output_dir", str(out), *flags])
        assert complete_run(cfg, 2) is None, flags
    _, cfg = training_config(["--config", job.config, "--output_dir", str(out)])
    assert complete_run(cfg, 1) is None and "the run is complete" in complete_run(cfg, 2)  # 1 task: another batch
    assert (out / "checkpoint-last.pth").stat().st_mtime_ns == before


def test_a_job_that_finds_its_run_complete_when_it_starts_trains_nothing(trained, tmp_path, monkeypatch, capsys):
    """(Completed after the submission, e.g. by an earlier job.) The job's code in this process, one task."""
    import shutil
    import types

    import submitit

    from submitit_train import Training
    run = tmp_path / "run"
    shutil.copytree(trained.ckpt, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"}
    env = types.SimpleNamespace(num_tasks=1, num_nodes=1, job_id="complete-test", global_rank=0, local_rank=0,
                                hostnames=["127.0.0.1"])
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # put back after the test (the job sets them)
    monkeypatch.setattr("utils.distributed.launched", lambda: False)  # no process group of one in this process
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        assert Training(["--config", trained.config, "--output_dir", str(run)], str(run))() == "complete"
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in handlers)  # a late signal requeues nothing
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "the run is complete; nothing to train" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"} == before  # the lock's pid aside


def test_a_failing_job_is_not_requeued_and_its_error_is_in_its_log(job):
    out = job.tmp / "failing"
    proc = launch(job, out, "--dataset", "folder:nowhere", tasks=1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "failed (" in stderr and "no folder at" in stderr, stderr[-3000:]
    job_id = stdout.split("submitted training job ")[1].split(":")[0]
    err = (job.tmp / "failing-jobs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "error: " in err and "no folder at" in err
    starts = (job.tmp / "failing-jobs" / job_id / f"{job_id}_0_log.out").read_text().count("Starting with")
    assert starts == 1  # ran once: not requeued


def test_the_launcher_checks_its_flags_and_mains_before_submitting(tiny, tmp_path, monkeypatch):
    import submitit.slurm.slurm

    from errors import UserError
    from submitit_train import submit
    cfg = tiny.write()
    with pytest.raises(UserError, match="should be|must be"):
        submit(["--cluster", "local", "--config", cfg, "--batch_size", "0", "--job_dir", str(tmp_path / "j")])
    with pytest.raises(UserError, match="give no --resume"):
        submit(["--cluster", "local", "--config", cfg, "--resume", "x.pth", "--job_dir", str(tmp_path / "j")])
    with pytest.raises(UserError, match="--nodes 1"):
        submit(["--cluster", "local", "--nodes", "2", "--config", cfg, "--job_dir", str(tmp_path / "j")])
    for flags in (["--nodes", "0"], ["--gpus_per_node", "-1"], ["--tasks_per_node", "0"]):
        with pytest.raises(UserError, match="--nodes and --tasks_per_node must be positive, --gpus_per_node at least 0"):
            submit(["--cluster", "local", *flags, "--config", cfg, "--job_dir", str(tmp_path / "j")])
    assert not (tmp_path / "j").exists()  # nothing submitted
    from submitit_train import eval_flags, executor, split_argv, training_config
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # "srun is there"
    for item in ("exclusive", "=true"):
        ours, _ = split_argv(["--sbatch", item])
        with pytest.raises(UserError, match=f"--sbatch expects KEY=VALUE, got {item!r}"):
            executor(ours, str(tmp_path / "j" / "%j"), 1)
    args, _ = training_config(["--config", cfg, "--data_path", str(tmp_path / "d"), "--device", "cpu",
                               "--num_workers", "0", "--cache_dir", str(tmp_path / "c")])
    assert eval_flags(args) == ["--data_path", str(tmp_path / "d"), "--cache_dir", str(tmp_path / "c"),
                                "--device", "cpu", "--num_workers", "0"]  # what the evaluation job is given
    args, _ = training_config(["--config", cfg])
    assert eval_flags(args) == []  # the config's own


def test_what_the_launcher_cannot_read_as_a_complete_run_goes_to_the_job(trained, tmp_path):
    """A garbage checkpoint-last.pth, an empty folder, a folder that does not exist: submitted (the
    job's own --resume auto says what is wrong); the finished run itself: not."""
    from submitit_train import complete_run, training_config
    _, cfg = training_config(["--config", trained.config, "--output_dir", str(trained.ckpt)])
    assert "the run is complete" in complete_run(cfg, 1)
    for folder in (tmp_path / "garbage", tmp_path / "empty", tmp_path / "none"):
        if folder.name != "none":
            folder.mkdir()
        if folder.name == "garbage":
            (folder / "checkpoint-last.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
        _, cfg = training_config(["--config", trained.config, "--output_dir", str(folder)])
        assert complete_run(cfg, 1) is None, folder.name


def test_the_slurm_executor_gets_the_clusters_settings(tmp_path, monkeypatch):
    """What the job asks Slurm for (no Slurm here: the executor's parameters, as submitit writes them)."""
    import submitit.slurm.slurm

    from submitit_train import executor, split_argv
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # "srun is there"
    ours, _ = split_argv(["--nodes", "2", "--gpus_per_node", "8", "--timeout", "240", "--partition", "gpu",
                          "--account", "lab", "--constraint", "volta32gb", "--signal_delay", "150",
                          "--max_requeues", "5", "--sbatch", "exclusive=true"])
    ex = executor(ours, str(tmp_path / "jobs" / "%j"), 8)
    params = ex._executor.parameters
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["time"] == 240 and params["partition"] == "gpu" and params["signal_delay_s"] == 150
    assert params["additional_parameters"] == {"exclusive": True, "account": "lab", "constraint": "volta32gb"}
    assert ex._executor.max_num_timeout == 5
    text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    assert "#SBATCH --signal=USR2@150" in text and "#SBATCH --exclusive\n" in text
    assert "#SBATCH --nodes=2" in text and "#SBATCH --account=lab" in text and "#SBATCH --ntasks-per-node=8" in text


def test_the_evaluation_job_scores_the_finished_runs_first_and_last_checkpoints(trained, tmp_path, monkeypatch):
    """The dependent job's code in this process (one task): test_mse_mfsim.py on checkpoint-last.pth,
    test_LR.py on the pair checkpoint-0.pth / checkpoint-last.pth of the run's own folder."""
    import shutil
    import types

    import submitit

    from submitit_train import Evaluation
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-0.pth", "checkpoint-last.pth"):
        shutil.copy(trained.ckpt / name, run / name)
    env = types.SimpleNamespace(num_tasks=1, num_nodes=1, job_id="evaluation-test", global_rank=0, local_rank=0,
                                hostnames=["127.0.0.1"])
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # put back after the test (the job sets them)
        monkeypatch.delenv(name)
    import submitit_train
    ports, run_task = [], submitit_train.run_task
    monkeypatch.setattr(submitit_train, "run_task", lambda entry, argv: ports.append(os.environ["MASTER_PORT"])
                        or run_task(entry, argv))
    small = ["--dataset", "digits@0", "--ood", "few=noise:gaussian:20"]  # two small sets: what is scored is the point
    assert Evaluation(str(run), ["--pretrained_ldm_cfg", trained.config, "--no_plots", *small])() == "evaluated"
    assert len(ports) == 2 and ports[0] != ports[1]  # each script's process group at a port of its own
    mse = json.loads((run / "results-checkpoint-last" / "results.json").read_text())["meta"]["checkpoints"]
    lr = json.loads((run / "results-LR" / "results.json").read_text())["meta"]["checkpoints"]
    assert [c["path"] for c in mse.values()] == [str(run / "checkpoint-last.pth")]
    assert (lr["first"]["path"], lr["end"]["path"]) == (str(run / "checkpoint-0.pth"), str(run / "checkpoint-last.pth"))
    assert (lr["first"]["epoch"], lr["end"]["epoch"]) == (0, 2)


def test_on_slurm_the_evaluation_job_waits_for_the_training_job_to_end_well(tiny, tmp_path, monkeypatch, capsys):
    """What submit hands the executor on a cluster (no Slurm here: an executor that records it), and
    on this machine (--cluster local), where each job is waited for in turn."""
    import types

    import submitit_train
    from submitit_train import Evaluation, Training

    class Recorder:
        def __init__(self):
            self.parameters, self.submitted = {"additional_parameters": {"account": "lab"}}, []

        def update_parameters(self, **kw):
            self.parameters.update({"additional_parameters" if k == "slurm_additional_parameters" else k: v
                                    for k, v in kw.items()})

        def submit(self, fn):
            self.submitted.append((fn, dict(self.parameters["additional_parameters"])))
            job_id = str(100 + len(self.submitted))
            return types.SimpleNamespace(job_id=job_id, paths=types.SimpleNamespace(stdout=f"{job_id}.out",
                                                                                 stderr=f"{job_id}.err"),
                                         results=lambda: [f"job {job_id}'s result"])

    ex = Recorder()
    seen = []
    monkeypatch.setattr(submitit_train, "executor", lambda ours, folder, tasks: seen.append((ours, tasks)) or ex)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    cfg = tiny.write()
    out = submitit_train.submit(["--cluster", "slurm", "--nodes", "2", "--gpus_per_node", "4", "--evaluate",
                                 "--config", cfg, "--data_path", str(tmp_path / "d"), "--job_dir", str(tmp_path / "j")])
    assert out == {"train": "101", "evaluate": "102"} and seen[0][1] == 4  # a task per GPU
    (train, train_extra), (evaluation, eval_extra) = ex.submitted
    assert isinstance(train, Training) and isinstance(evaluation, Evaluation)
    assert train_extra == {"account": "lab"} and eval_extra == {"account": "lab", "dependency": "afterok:101"}
    assert evaluation.output_dir == str(tiny.ckpt) and evaluation.common == ["--data_path", str(tmp_path / "d")]
    printed = capsys.readouterr().out
    assert "submitted training job 101: 2 node(s) x 4 task(s)" in printed and "scancel 101" in printed
    assert "submitted evaluation job 102, after job 101 ends well" in printed
    ex.submitted.clear()
    assert submitit_train.submit(["--cluster", "slurm", "--config", cfg, "--output_dir", str(tmp_path / "o"),
                                  "--job_dir", str(tmp_path / "j")]) == {"train": "101"}
    assert len(ex.submitted) == 1  # no --evaluate: no second job
    ex.__init__()  # on this machine: each job waited for in turn, the evaluation with no dependency
    capsys.readouterr()
    assert submitit_train.submit(["--cluster", "local", "--evaluate", "--config", cfg, "--output_dir",
                                  str(tmp_path / "l"), "--job_dir", str(tmp_path / "j")]) == {"train": "101", "evaluate": "102"}
    (train, train_extra), (evaluation, eval_extra) = ex.submitted
    assert isinstance(evaluation, Evaluation) and evaluation.output_dir == str(tmp_path / "l") and "dependency" not in eval_extra
    printed = capsys.readouterr().out
    assert "training job 101: job 101's result" in printed and "evaluation job 102: job 102's result" in printed
