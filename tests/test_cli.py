"""cli.py: flags made from the config's fields, --help showing the config in use, --opt, the error
boundary (one line, exit 2), and docs/USAGE.md's flag tables (tools/flag_docs.py)."""
import json
import os
import re
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from cli import COMMON_FLAGS, EVAL_FLAGS, SCORE_FLAGS, resolve_config
from dlsr.detector import DLSRDetector
from errors import UserError
from experiment.config import CHOICES, choices, field_of, field_type, load_config
from tests.helpers import ROOT, error_line, last, run_inprocess, try_evaluate
from tools.flag_docs import SCRIPTS, USAGE, parser_of, rewrite

TORCHRUN = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--max_restarts",
            "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id"}


RELEASE_ONLY = {"--ldm_steps"}  # named where the docs say what the release did with it


SLURM = {"--signal", "--dependency", "--gpus", "--ntasks", "--requeue", "--time"}  # sbatch's, in docs/OPERATIONS.md


DOCKER = {"--shm"}  # docker run's --shm-size, in docs/OPERATIONS.md


PIP = {"--no"}  # pip's --no-deps and --no-index, in docs/OPERATIONS.md


PYTEST = {"--dist", "--durations"}  # pytest-xdist's and pytest's, in docs/USAGE.md


def gpu_check_flags():
    """bench/gpu_check.py's flags, read from its source (its parser is built inside main())."""
    with open(os.path.join(ROOT, "bench", "gpu_check.py")) as f:
        return set(re.findall(r'add_argument\("(--[a-z_]+)"', f.read()))


DOCS = ("README.md", "docs/USAGE.md", "docs/OPERATIONS.md", "docs/EXTENDING.md")


def config_actions(script):
    return {a.config_key: a for a in parser_of(script)._actions if getattr(a, "config_key", None)}


def help_line(text: str, flag: str) -> str:
    """The help entry of ``flag`` in --help output, its wrapped lines joined."""
    entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", text, re.M | re.S).group(0)
    return " ".join(entry.split())


def args_of(script, *argv):
    return parser_of(script).parse_args(list(argv))


def vars_of(script, *argv) -> dict:
    """The parsed flags by name, as the scripts hand them to resolve_config."""
    return vars(args_of(script, *argv))


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
    "a log folder that is a file": ("main.py", ["--config", "CFG", "--log_dir", "TMP/img.png"],
                                    "log folder 'TMP/img.png' is a file, not a folder"),
    "a run folder that is a file": ("main.py", ["--config", "CFG", "--output_dir", "TMP/img.png"],
                                    "output folder 'TMP/img.png' is a file, not a folder"),
    "a cache folder that is a file": ("main.py", ["--config", "CFG", "--cache_dir", "TMP/img.png"],
                                      "feature cache folder 'TMP/img.png' is a file, not a folder"),
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


def test_messages_name_the_real_problem(trained, tmp_path):
    assert "is a folder, not a checkpoint file" in error_line(
        try_evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path)))
    line = error_line(run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                                    "--pretrained_ldm_cfg", str(tmp_path), check=False))
    assert "is a folder, not a YAML file" in line
    (tmp_path / "notes.pth").write_text("these are my notes\n")
    line = error_line(try_evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "notes.pth")))
    assert "a text or other file" in line and "run code" not in line
    odd = tmp_path / "bad\nname.pth"
    odd.write_text("x")
    proc = try_evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(odd))
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad\\nname.pth" in error_line(proc)


def test_the_usage_tables_are_the_parsers_tables():
    with open(os.path.join(ROOT, USAGE)) as f:
        usage = f.read()
    for script in SCRIPTS:
        assert f"<!-- flags: {script} -->" in usage, script
    assert rewrite(usage) == usage, "docs/USAGE.md's flag tables are stale: run python -m tools.flag_docs"


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_the_docs_name_exists(doc):
    with open(os.path.join(ROOT, doc)) as f:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", f.read()))
    ours = {s for script in SCRIPTS for a in parser_of(script)._actions for s in a.option_strings}
    assert named - ours - TORCHRUN - RELEASE_ONLY - SLURM - DOCKER - PIP - PYTEST - gpu_check_flags() == set()


def test_each_config_flag_is_made_from_its_field():
    from main import TRAIN_FLAGS

    wanted = {"main.py": {*COMMON_FLAGS, *TRAIN_FLAGS}, "test_mse_mfsim.py": {*COMMON_FLAGS, *EVAL_FLAGS, *SCORE_FLAGS},
              "test_LR.py": {*COMMON_FLAGS, *EVAL_FLAGS, *SCORE_FLAGS}, "predict.py": {*COMMON_FLAGS, *SCORE_FLAGS}}
    for script, keys in wanted.items():
        actions = config_actions(script)
        assert set(actions) == keys, script
        for key, action in actions.items():
            meta = field_of(key).metadata
            assert action.help.startswith(meta["help"]) and "default" not in action.help, key
            scalar = typing.get_origin(field_type(key)) not in (list, dict)
            assert action.choices == (choices(key) if key in CHOICES and scalar else None), key
    # The release's names, the seed README's interface.
    train = {s for a in parser_of("main.py")._actions for s in a.option_strings}
    assert {"--dataset", "--batch_size", "--epochs", "--accum_iter", "--lr", "--blr", "--min_lr", "--cosine_lr",
            "--warmup_epochs", "--weight_decay", "--seed", "--output_dir", "--log_dir", "--device", "--resume",
            "--pre_ckpt_path", "--data_path"} <= train
    evaluate = {s for a in parser_of("test_LR.py")._actions for s in a.option_strings}
    assert {"--pretrained_ldm_ckpt_first", "--pretrained_ldm_ckpt_end", "--pretrained_ldm_cfg", "--evaluate",
            "--similarity_type", "--subset_timesteps_num", "--eta", "--data_path"} <= evaluate


def test_help_shows_the_values_of_the_config_in_use(tiny, trained, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: paths are not wrapped at their hyphens
    cfg = tiny.write(train={"batch_size": 17, "cosine_lr": True}, eval={"batch_size": 33, "fpr95": "ood_positive"})
    text = run_inprocess("main.py", "--help", "--config", cfg).stdout
    assert help_line(text, "--batch_size").endswith(f"[{cfg}: 17]")
    assert help_line(text, "--cosine_lr").endswith(f"[{cfg}: true]")
    assert help_line(text, "--no_cache").endswith(f"[{cfg}: true]")  # the field's value, which the switch turns off
    text = run_inprocess("test_LR.py", "--pretrained_ldm_cfg", cfg, "--help").stdout
    assert help_line(text, "--batch_size").endswith(f"[{cfg}: 33]")
    assert help_line(text, "--fpr95").endswith(f"[{cfg}: ood_positive]")
    assert help_line(text, "--ood").endswith(f"[{cfg}: gauss=noise:gaussian:200 photos=photos:200]")
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    text = run_inprocess("predict.py", "--help", "--checkpoint", ckpt).stdout
    assert help_line(text, "--batch_size").endswith(f"[the config stored in {ckpt}: 64]")  # the checkpoint's own
    text = run_inprocess("predict.py", "--help", "--checkpoint", ckpt, "--config", cfg).stdout
    assert help_line(text, "--batch_size").endswith(f"[{cfg}: 33]")
    text = run_inprocess("main.py", "--help", "--config", str(tiny.tmp / "missing.yaml")).stdout
    assert "[built-in;" in help_line(text, "--batch_size") and help_line(text, "--batch_size").endswith(": 256]")
    raw = torch.load(ckpt, weights_only=True)
    raw["config"]["eval"]["batch_size"] = "many"  # a stored config that no longer loads
    torch.save(raw, tiny.tmp / "odd.pth")
    text = run_inprocess("predict.py", "--help", "--checkpoint", str(tiny.tmp / "odd.pth")).stdout
    assert help_line(text, "--batch_size").endswith("[built-in; the checkpoint's stored config is invalid: 64]")


def test_flags_set_their_config_keys(tiny):
    from main import TRAIN_FLAGS

    path = tiny.write(eval={"groups": {"gauss": "far"}})
    cfg = resolve_config(path, vars_of("main.py", "--no_cache", "--no_amp", "--channels_last", "--cosine_lr",
                                       "--subset", "12", "--lr", "0.5"), TRAIN_FLAGS)
    assert (cfg.train.cache_features, cfg.amp, cfg.channels_last, cfg.train.cosine_lr) == (False, False, True, True)
    assert (cfg.train.subset, cfg.train.lr) == (12, 0.5)
    untouched = resolve_config(path, vars_of("main.py"), TRAIN_FLAGS)
    assert untouched == load_config(path)

    keys = (*EVAL_FLAGS, *SCORE_FLAGS)
    cfg = resolve_config(path, vars_of("test_LR.py", "--group", "photos=near", "--baselines", "knn, mahalanobis",
                                       "--knn_k", "1,7", "--batch_size", "5"), keys)
    assert cfg.eval.groups == {"gauss": "far", "photos": "near"}  # --group adds to the config's groups
    assert (cfg.eval.baselines, cfg.eval.knn_k, cfg.eval.batch_size) == (["knn", "mahalanobis"], [1, 7], 5)
    cfg = resolve_config(path, vars_of("test_LR.py", "--ood", "new=digits@3", "--baselines", ""), keys)
    assert cfg.eval.ood == {"new": "digits@3"} and cfg.eval.groups == {} and cfg.eval.baselines == []
    for argv, message in ((["--ood", "a=digits", "--ood", "a=photos:9"], "names 'a' twice"),
                          (["--ood", "nospec"], "--ood expects NAME=SPEC"),
                          (["--group", "gauss=middle"], "eval.groups.gauss must be one of near, far"),
                          (["--baselines", "knn,lof"], r"eval.baselines\[1\] must be one of knn, mahalanobis"),
                          (["--knn_k", "1,x"], r"eval.knn_k\[1\] should be an integer, got 'x'"),
                          (["--opt", "eval.seed"], r"--opt expects KEY=VALUE, got 'eval.seed'")):
        with pytest.raises(UserError, match=message):
            resolve_config(path, vars_of("test_LR.py", *argv), keys)
    with pytest.raises(SystemExit):  # a choice outside the table is refused by the parser itself
        args_of("test_LR.py", "--indexing", "other")


def test_the_headline_score_and_device_default_to_the_config(trained, tmp_path):



    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    for extra, score in (((), "MFsim"), (("--opt", "eval.similarity_type=MSE"), "MSE")):
        out = tmp_path / f"{score}.csv"
        run_inprocess("predict.py", "--checkpoint", ckpt, "--images", str(folder), "--output", str(out), *extra)
        assert json.loads(out.with_suffix(".json").read_text())["score"] == score
    cfg = load_config(trained.config)
    cfg.eval.similarity_type = "MSE"
    det = DLSRDetector(cfg)
    assert det.score == "MSE" and det.ctx.device.type == cfg.device == "cpu"


def test_an_unknown_section_in_opt_is_an_error_naming_the_key():
    proc = run_inprocess("main.py", "--opt", "nope.x=1", check=False)
    assert proc.returncode == 2 and "unknown config key 'nope.x'" in proc.stderr


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
    assert proc.returncode == 2 and fill(says) in last(proc), proc.stderr[-800:]
    assert "Traceback" not in proc.stderr
    assert {p: os.path.getmtime(p) for p in before} == before  # no input touched


def test_a_negative_learning_rate_reaches_the_range_check():
    proc = run_inprocess("main.py", "--lr", "-1e-4", check=False)
    assert proc.returncode == 2 and "train.lr must be in [0, inf), got -0.0001" in last(proc)


def test_run_entry_keeps_freed_memory_before_it_runs_main(monkeypatch):
    import cli
    order = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: order.append("tuned"))
    cli.run_entry(lambda argv: order.append(("main", argv)), ["--x"])
    assert order == ["tuned", ("main", ["--x"])]


def test_a_bool_config_field_becomes_a_switch_only_with_the_value_it_sets():
    """A switch sets its field's ``const``; a bool field without one (``download``) cannot be made a flag."""
    import argparse

    from cli import add_config_flags
    p = argparse.ArgumentParser()
    add_config_flags(p, ["train.cache_features", "eval.layer_norm"])
    assert vars(p.parse_args([])) == {"no_cache": None, "layer_norm": None}
    assert vars(p.parse_args(["--no_cache", "--layer_norm"])) == {"no_cache": False, "layer_norm": True}
    with pytest.raises(TypeError, match="config field download needs const= .* to be a flag"):
        add_config_flags(argparse.ArgumentParser(), ["download"])
