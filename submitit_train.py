"""Train on a Slurm cluster: one job whose tasks are the ranks, requeued on preemption and at the time
limit until the run is complete (docs/OPERATIONS.md, "Slurm").

    python submitit_train.py --config config/Config.yaml --data_path ./data \
        --nodes 2 --gpus_per_node 8 --timeout 1440 --partition gpu --evaluate

Every flag main.py takes passes through; the cluster's own are listed by --help. The job runs
``main.py --resume auto`` in each task (rank, local rank, world size and the rendezvous come from
submitit's job environment: no torchrun inside). When Slurm signals the job (a preemption's
SIGTERM, or SIGUSR2 --signal_delay seconds before the time limit), the ranks take main.py's stop
path (a save inside the epoch), then rank 0 requeues the job through submitit's checkpoint
protocol, and the requeued job continues the same run from checkpoint-last.pth. ``--evaluate``
submits test_mse_mfsim.py and test_LR.py on the finished run as a dependent job.
``--cluster local`` runs the same job on this machine (``--tasks_per_node N`` gloo ranks on a CPU)
and waits for it.
"""
import argparse
import json
import os
import signal
import socket
import sys
import time
import zlib
from typing import List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))


class Training:
    """The job: main.py with ``--resume auto`` in every task; checkpointable (submitit calls
    ``checkpoint`` to requeue it), so a requeued job continues the run where it stopped."""

    def __init__(self, argv: List[str], log_folder: str, attempt: int = 0):
        self.argv, self.log_folder, self.attempt = list(argv), log_folder, attempt

    def __call__(self) -> str:
        import submitit

        import main
        from errors import Preempted
        env = submitit.JobEnvironment()
        ranks_from(env, self.attempt)
        try:
            run_task(main.main, [*self.argv, "--resume", "auto"])
        except Preempted as stop:
            self.requeue(env, stop)
        # The run is complete: a signal from here on (a late preemption) must not requeue it.
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_IGN)
        return "complete"

    def requeue(self, env, stop) -> None:
        """After the save: rank 0 writes one line in the run's log and hands over to submitit, whose
        handler (of its preemption signal, SIGUSR2) calls ``checkpoint`` and requeues the job; the
        other ranks leave (exit 143), and the requeued job restarts them all."""
        if env.global_rank != 0:
            sys.exit(143)
        log_requeue(self.log_folder, env.job_id, self.attempt + 1, str(stop))
        print(f"requeueing: {stop}", file=sys.stderr, flush=True)
        signal.raise_signal(env._usr_sig())  # submitit's handler: checkpoint, requeue, exit (144 locally)
        sys.exit(143)  # not reached: the handler exits

    def checkpoint(self, *args, **kwargs):
        """What submitit resubmits: the same training, its next attempt (a new rendezvous port)."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(Training(self.argv, self.log_folder, self.attempt + 1))


class Evaluation:
    """The dependent job: test_mse_mfsim.py and test_LR.py on the finished run's checkpoints."""

    def __init__(self, output_dir: str, common: List[str]):
        self.output_dir, self.common = output_dir, list(common)

    def __call__(self) -> str:
        import submitit

        import test_LR
        import test_mse_mfsim
        env = submitit.JobEnvironment()
        last = os.path.join(self.output_dir, "checkpoint-last.pth")
        ranks_from(env, 0)
        run_task(test_mse_mfsim.main, ["--pretrained_ldm_ckpt", last, *self.common])
        ranks_from(env, 1)  # a process group of its own, at another port
        run_task(test_LR.main, ["--pretrained_ldm_ckpt_first", os.path.join(self.output_dir, "checkpoint-0.pth"),
                                "--pretrained_ldm_ckpt_end", last, *self.common])
        return "evaluated"


def run_task(entry, argv: List[str]) -> None:
    """An entry script's ``main`` in a job's task: a problem is one line in the task's log and the task
    ends with its status (the job is not requeued); a preemption is raised for the caller."""
    from errors import Preempted, UserError, one_line
    from utils.distributed import launched_as_main
    from utils.progress import setup_logging
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    setup_logging(launched_as_main())
    try:
        entry(argv)
    except Preempted:
        raise
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise JobFailed(one_line(e)) from None  # submitit records the failure at once: not requeued


class JobFailed(Exception):
    """A task's run stopped on a problem the user can fix (the line is in the task's log)."""


def ranks_from(env, attempt: int) -> None:
    """torchrun's variables from submitit's job environment: each task is one rank."""
    per_node = max(1, env.num_tasks // max(1, env.num_nodes))
    port = 20000 + zlib.crc32(str(env.job_id).encode()) % 20000 + attempt % 100
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR=env.hostnames[0] if env.hostnames else
                      socket.gethostname(), MASTER_PORT=str(port))


def log_requeue(log_folder: str, job_id: str, attempt: int, reason: str) -> None:
    """One line in the run's log.txt (a line without "epoch": resumed runs keep it)."""
    from store.checkpoint import peek
    held = peek(os.path.join(log_folder, "checkpoint-last.pth")) or {}
    line = {"requeue": attempt, "job_id": str(job_id), "run_id": held.get("run_id"),
            "requeued_at_epoch": held.get("epoch"), "step": (held.get("in_progress") or {}).get("step"),
            "reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(log_folder, "log.txt"), "a") as f:
        f.write(json.dumps(line) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Submit main.py as a Slurm job that requeues itself until the run is "
                                            "complete; main.py's own flags pass through.",
                                epilog="Every other flag is main.py's (python main.py --help).")
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm, or local: the same job as processes on this machine, waited for (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per node, one task (rank) each (default: %(default)s)")
    p.add_argument("--tasks_per_node", type=int, help="ranks per node (default: --gpus_per_node; on CPUs, gloo ranks)")
    p.add_argument("--cpus_per_task", type=int, default=10, help="CPU cores per task (default: %(default)s)")
    p.add_argument("--mem_gb", type=int, help="memory per node in GB (default: Slurm's)")
    p.add_argument("--timeout", type=float, default=4320, metavar="MINUTES", help="time limit of each job in minutes "
                   "(default: %(default)s)")
    p.add_argument("--signal_delay", type=int, default=120, metavar="SECONDS",
                   help="Slurm signals the job this long before its time limit, for a step and a save (default: %(default)s)")
    p.add_argument("--max_requeues", type=int, default=3, metavar="N",
                   help="requeues after reaching the time limit, at most; preemptions requeue as Slurm decides (default: %(default)s)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--constraint", help="Slurm constraint (e.g. volta32gb)")
    p.add_argument("--qos", help="Slurm QOS")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other #SBATCH option, e.g. --sbatch exclusive=true (repeatable)")
    p.add_argument("--job_dir", default="jobs/%j", metavar="PATH",
                   help="submitit's folder: job pickles and logs; %%j is the job id (default: %(default)s)")
    p.add_argument("--job_name", default="dlsr", help="the job's name (default: %(default)s)")
    p.add_argument("--evaluate", action="store_true",
                   help="also submit test_mse_mfsim.py and test_LR.py on the finished run (a dependent job)")
    return p


def split_argv(argv: Optional[List[str]]):
    """(the launcher's flags, main.py's flags)."""
    ours, rest = build_parser().parse_known_args(argv)
    return ours, rest


def training_config(rest: List[str]):
    """main.py's config for ``rest``, checked as main.py checks it (so a bad flag fails here, not in a queue)."""
    import main
    from cli import resolve_config
    from errors import UserError
    args = main.parse_args(rest)
    if args.resume is not None or args.overwrite or args.pre_ckpt_path:
        raise UserError("the launcher continues the output folder's run (main.py --resume auto): give no "
                        "--resume, --overwrite or --pre_ckpt_path; start a new run in another --output_dir")
    return args, resolve_config(args.config, vars(args), main.TRAIN_FLAGS)


def executor(ours, folder: str, tasks: int):
    """The submitit executor of the cluster chosen, its resources set."""
    import submitit

    from errors import UserError
    from experiment.config import parse_value
    if ours.cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=ours.max_requeues)
        ex.update_parameters(timeout_min=ours.timeout, signal_delay_s=ours.signal_delay, tasks_per_node=tasks,
                             nodes=1, gpus_per_node=ours.gpus_per_node if ours.tasks_per_node is None else 0)
        return ex
    ex = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=ours.max_requeues, cluster="slurm")
    extra = {}
    for item in ours.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--sbatch expects KEY=VALUE, got {item!r}")
        extra[key] = parse_value(value)  # true: a flag without a value (#SBATCH --exclusive)
    for key in ("account", "constraint", "qos"):
        if getattr(ours, key):
            extra[key] = getattr(ours, key)
    ex.update_parameters(name=ours.job_name, nodes=ours.nodes, tasks_per_node=tasks, gpus_per_node=ours.gpus_per_node,
                         cpus_per_task=ours.cpus_per_task, timeout_min=int(ours.timeout),
                         slurm_signal_delay_s=ours.signal_delay, slurm_partition=ours.partition,
                         slurm_additional_parameters=extra, **({"mem_gb": ours.mem_gb} if ours.mem_gb else {}))
    return ex


def eval_flags(args) -> List[str]:
    """The flags of main.py's command line that the evaluation scripts share (paths, device, workers)."""
    out = []
    for name in ("data_path", "cache_dir", "backbone_weights", "device", "num_workers"):
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def submit(argv: Optional[List[str]] = None) -> dict:
    """Submit the training (and the dependent evaluation); print what to follow; return the job ids."""
    from errors import UserError
    ours, rest = split_argv(argv)
    args, cfg = training_config(rest)
    if ours.nodes < 1 or ours.gpus_per_node < 0 or (ours.tasks_per_node is not None and ours.tasks_per_node < 1):
        raise UserError("--nodes and --tasks_per_node must be positive, --gpus_per_node at least 0")
    if ours.cluster == "local" and ours.nodes != 1:
        raise UserError("--cluster local runs on this machine: --nodes 1")
    tasks = ours.tasks_per_node or max(1, ours.gpus_per_node)
    done = complete_run(cfg, ours.nodes * tasks)
    if done:
        print(f"nothing submitted: {done}", flush=True)
        return {}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    from submitit_train import Evaluation, Training  # pickled by name: the tasks import this module
    ex = executor(ours, ours.job_dir, tasks)
    job = ex.submit(Training(rest, cfg.log_folder))
    out = {"train": job.job_id}
    print(f"submitted training job {job.job_id}: {ours.nodes} node(s) x {tasks} task(s), run folder "
          f"{cfg.output_dir}\n  log:    {job.paths.stdout} (and .err; one per task)\n"
          f"  follow: tail -f {job.paths.stderr}\n  cancel: {'scancel ' + str(job.job_id) if ours.cluster == 'slurm' else 'kill the job'}",
          flush=True)
    common = [*eval_flags(args)]
    if ours.cluster == "local":
        print(f"training job {job.job_id}: {waited(job)}", flush=True)  # the local executor requeues as Slurm would
        if ours.evaluate:
            evaluation = ex.submit(Evaluation(cfg.output_dir, common))
            out["evaluate"] = evaluation.job_id
            print(f"evaluation job {evaluation.job_id}: {waited(evaluation)} (results beside {cfg.output_dir})")
        return out
    if ours.evaluate:
        ex.update_parameters(slurm_additional_parameters={**ex.parameters.get("additional_parameters", {}),
                                                          "dependency": f"afterok:{job.job_id}"})
        evaluation = ex.submit(Evaluation(cfg.output_dir, common))
        out["evaluate"] = evaluation.job_id
        print(f"submitted evaluation job {evaluation.job_id}, after job {job.job_id} ends well: results beside "
              f"{cfg.output_dir}")
    return out


def complete_run(cfg, world_size: int) -> Optional[str]:
    """Why no job is needed: the output folder holds this run (as main.py --resume auto decides), and
    it is complete; None otherwise (the job decides, and checks again when it starts)."""
    from engine.training import completion
    from experiment.run import held_differences
    from store.checkpoint import peek
    last = os.path.join(cfg.output_dir, "checkpoint-last.pth")
    held = peek(last)
    if held is None or held_differences(cfg, world_size, held):
        return None
    return completion(cfg, last, held.get("epoch"), held.get("in_progress"))


def waited(job) -> str:
    """The outcome of a local job once it ends; a job that failed is one line: its own last error line and its log."""
    from errors import UserError
    try:
        return job.results()[0]  # rank 0's; every task runs the same
    except Exception:  # submitit's UncompletedJobError / FailedJobError: the task's own log says why
        log = str(job.paths.stderr)
        lines = open(log, errors="replace").read().strip().splitlines() if os.path.isfile(log) else []
        said = next((line for line in reversed(lines) if line.startswith("error: ")), "see its log")
        raise UserError(f"job {job.job_id} failed ({said.removeprefix('error: ')}); log: {log}") from None


def main(argv: Optional[List[str]] = None) -> None:
    submit(argv)


if __name__ == "__main__":
    from cli import run_entry
    run_entry(main)
