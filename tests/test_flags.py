"""The flags are made from the config: names, types, help and allowed values come from its fields,
--help shows the values of the config in use, and the flag tables of docs/USAGE.md are those of the parsers."""
import ast
import dataclasses
import os
import re

import typing

import pytest

from models.features import BackboneId, MultiLayerFeatures
from tests.helpers import ROOT, run_inprocess
from utils.checkpoint import load_checkpoint
from utils.cli import COMMON_FLAGS, EVAL_FLAGS, SCORE_FLAGS, resolve_config
from utils.config import CHOICES, field_of, field_type, load_config
from errors import UserError
from utils.features import cache_key
from utils.flag_docs import SCRIPTS, USAGE, parser_of, rewrite

TORCHRUN = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--max_restarts",
            "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id"}
RELEASE_ONLY = {"--ldm_steps"}  # named where the docs say what the release did with it
SLURM = {"--signal"}  # sbatch's, in docs/OPERATIONS.md
DOCKER = {"--shm"}  # docker run's --shm-size, in docs/OPERATIONS.md
PIP = {"--no"}  # pip's --no-deps and --no-index, in docs/OPERATIONS.md
DOCS = ("README.md", "docs/USAGE.md", "docs/OPERATIONS.md")


def config_actions(script):
    return {a.config_key: a for a in parser_of(script)._actions if getattr(a, "config_key", None)}


def help_line(text: str, flag: str) -> str:
    """The help entry of ``flag`` in --help output, its wrapped lines joined."""
    entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", text, re.M | re.S).group(0)
    return " ".join(entry.split())


def test_the_usage_tables_are_the_parsers_tables():
    with open(os.path.join(ROOT, USAGE)) as f:
        usage = f.read()
    for script in SCRIPTS:
        assert f"<!-- flags: {script} -->" in usage, script
    assert rewrite(usage) == usage, "docs/USAGE.md's flag tables are stale: run python -m utils.flag_docs"


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_the_docs_name_exists(doc):
    with open(os.path.join(ROOT, doc)) as f:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", f.read()))
    ours = {s for script in SCRIPTS for a in parser_of(script)._actions for s in a.option_strings}
    assert named - ours - TORCHRUN - RELEASE_ONLY - SLURM - DOCKER - PIP == set()


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
            assert action.choices == (CHOICES[key] if key in CHOICES and scalar else None), key
    # The release's names, the seed README's interface.
    train = {s for a in parser_of("main.py")._actions for s in a.option_strings}
    assert {"--dataset", "--batch_size", "--epochs", "--accum_iter", "--lr", "--blr", "--min_lr", "--cosine_lr",
            "--warmup_epochs", "--weight_decay", "--seed", "--output_dir", "--log_dir", "--device", "--resume",
            "--pre_ckpt_path", "--data_path"} <= train
    evaluate = {s for a in parser_of("test_LR.py")._actions for s in a.option_strings}
    assert {"--pretrained_ldm_ckpt_first", "--pretrained_ldm_ckpt_end", "--pretrained_ldm_cfg", "--evaluate",
            "--similarity_type", "--subset_timesteps_num", "--eta", "--data_path"} <= evaluate


def test_help_shows_the_values_of_the_config_in_use(tiny, trained, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag: paths are not wrapped at their hyphens
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
    assert help_line(text, "--batch_size").endswith(f"[{ckpt}: 64]")  # the checkpoint's own config
    text = run_inprocess("predict.py", "--help", "--checkpoint", ckpt, "--config", cfg).stdout
    assert help_line(text, "--batch_size").endswith(f"[{cfg}: 33]")
    text = run_inprocess("main.py", "--help", "--config", str(tiny.tmp / "missing.yaml")).stdout
    assert "[built-in;" in help_line(text, "--batch_size") and help_line(text, "--batch_size").endswith(": 256]")


def args_of(script, *argv):
    return parser_of(script).parse_args(list(argv))


def vars_of(script, *argv) -> dict:
    """The parsed flags by name, as the scripts hand them to resolve_config."""
    return vars(args_of(script, *argv))


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
                          (["--knn_k", "1,x"], "eval.knn_k should be")):
        with pytest.raises(UserError, match=message):
            resolve_config(path, vars_of("test_LR.py", *argv), keys)
    with pytest.raises(SystemExit):  # a choice outside the table is refused by the parser itself
        args_of("test_LR.py", "--indexing", "other")


def test_models_and_datasets_never_import_utils():
    for package in ("models", "datasets"):
        folder = os.path.join(ROOT, package)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
                       [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            assert not [m for m in imported if m == "utils" or m.startswith("utils.")], f"{package}/{name}"


def test_one_backbone_id_for_checkpoints_cache_and_checks(trained):
    from datasets import build_dataset

    cfg = load_config(trained.config)
    extractor = MultiLayerFeatures(cfg.backbone.name, cfg.backbone.weights)
    bid = extractor.backbone_id(cfg.backbone.input_size)
    assert (bid.name, bid.input_size, bid.feature_dim, bid.layers, bid.indices) == \
           ("efficientnet-lite0", 32, 512, (0, 1, 2, 3, 4), (16, 40, 80, 192, 512))
    assert bid.identity == extractor.identity and bid.weights == extractor.digest
    with pytest.raises(dataclasses.FrozenInstanceError):
        bid.input_size = 64
    # What training stored is this id's record, field for field.
    assert load_checkpoint(str(trained.ckpt / "checkpoint-last.pth")).backbone == bid.record() == {
        "name": "efficientnet-lite0", "identity": extractor.identity, "input_size": 32, "feature_dim": 512,
        "indices": [16, 40, 80, 192, 512], "layers": [0, 1, 2, 3, 4]}
    # The cache key follows the id: another input size or other weights is another file.
    ds = build_dataset("noise:uniform:4", "test", cfg.data_path, 32)
    key = cache_key(bid, ds, "test", "fp32", 8)
    assert (key["backbone"], key["input_size"]) == (bid.identity, 32)
    assert cache_key(dataclasses.replace(bid, input_size=64), ds, "test", "fp32", 8) != key
    assert cache_key(dataclasses.replace(bid, weights="0" * 16), ds, "test", "fp32", 8) != key
    # The taps the LFDN uses select from the cached raw vector, so they do not change the key.
    assert cache_key(MultiLayerFeatures(cfg.backbone.name, layers=[4]).backbone_id(32), ds, "test", "fp32", 8) == key
    assert isinstance(bid, BackboneId)


def test_the_headline_score_and_device_default_to_the_config(trained, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from utils.detector import DLSRDetector

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
