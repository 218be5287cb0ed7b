"""The typed config: shipped configs load, the release's and the paper's hyperparameters, unknown keys
named, types and choices checked, overrides parsed, a saved config read back equal."""
import os

import pytest
import yaml

from tests.helpers import ROOT
from utils.config import Config, config_from_dict, config_to_dict, load_config, override
from errors import UserError


@pytest.mark.parametrize("name", ["Config", "Config_paper", "Config_resnet50", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(os.path.join(ROOT, "config", f"{name}.yaml"))
    assert isinstance(cfg, Config)


def test_release_and_paper_hyperparameters():
    rel = load_config(os.path.join(ROOT, "config", "Config.yaml"))
    paper = load_config(os.path.join(ROOT, "config", "Config_paper.yaml"))
    assert (rel.train.lr, rel.train.weight_decay, rel.train.batch_size, rel.train.epochs) == (1e-5, 0.02, 256, 150)
    assert (paper.train.lr, paper.train.weight_decay, paper.train.batch_size, paper.train.epochs) == (1e-4, 1e-4, 128, 150)
    assert list(rel.eval.ood) == ["CIFAR100", "SVHN", "LSUN", "LSUN_resize", "iSUN", "DTD", "Places365"]
    assert rel.diffusion.subset_timesteps_num == 3 and rel.eval.batch_size == 256 and rel.num_workers is None


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"batchsize": 3}}))
    with pytest.raises(UserError, match=r"unknown key 'train.batchsize'"):
        load_config(str(p))
    with pytest.raises(UserError, match=r"unknown key 'colour'"):
        config_from_dict({"colour": 1})


def test_types_and_choices_are_checked():
    with pytest.raises(UserError, match="train.epochs should be an integer"):
        config_from_dict({"train": {"epochs": "many"}})
    with pytest.raises(UserError, match="eval.similarity_type must be one of"):
        config_from_dict({"eval": {"similarity_type": "cosine"}})
    with pytest.raises(UserError, match="train.batch_size must be positive"):
        config_from_dict({"train": {"batch_size": 0}})
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0  # an int is a fine float


def test_overrides_parse_and_check():
    cfg = Config()
    override(cfg, "train.epochs", "7")
    override(cfg, "train.lr", "null")
    override(cfg, "eval.ood", {"A": "digits"})
    assert cfg.train.epochs == 7 and cfg.train.lr is None and cfg.eval.ood == {"A": "digits"}
    with pytest.raises(UserError, match="unknown config key 'train.nope'"):
        override(cfg, "train.nope", "1")
    with pytest.raises(UserError, match="unknown config key 'train'"):
        override(cfg, "train", "1")
    with pytest.raises(UserError, match="should be"):
        override(cfg, "train.epochs", "1.5")


def test_round_trip():
    cfg = load_config(os.path.join(ROOT, "config", "Config.yaml"))
    assert config_from_dict(config_to_dict(cfg)) == cfg
