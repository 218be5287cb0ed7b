"""experiment/config.py: the typed YAML config (unknown keys, types, ranges, repeated keys, YAML
quirks, overlays on a base file) and the shipped presets."""
import os

import pytest
import yaml

from errors import UserError
from experiment.config import (
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    override,
)
from tests.helpers import ROOT, error_line, last, run_inprocess, try_evaluate


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


@pytest.mark.parametrize("args,expected", [
    (["--subset_timesteps_num", "100"], "subset_timesteps_num (k) must be in 1..99"),
    (["--subset_timesteps_num", "1000"], "must be in 1..99"),
    (["--eta", "-1"], "diffusion.eta must be in [0, 1]"),
    (["--eta", "1.5"], "diffusion.eta must be in [0, 1]"),
    (["--eta", "nan"], "diffusion.eta must be in [0, 1]"),
    (["--opt", "lfdn.dropout=1.0"], "lfdn.dropout must be in [0, 1)"),
    (["--opt", "backbone.input_size=16"], "backbone.input_size must be at least 32"),
])
def test_bad_score_settings_are_refused_before_any_work(trained, tmp_path, args, expected):
    line = error_line(try_evaluate(trained, tmp_path / "o", "--cache_dir", str(tmp_path / "cache"), *args))
    assert expected in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,expected", [
    (["--lr", "-1"], "train.lr must be in [0, inf)"),
    (["--weight_decay", "-0.1"], "train.weight_decay must be in [0, inf)"),
    (["--opt", "train.betas=[1.0,0.9]"], "train.betas must be two numbers in [0, 1)"),
    (["--opt", "train.betas=[0.9,-0.1]"], "train.betas must be two numbers in [0, 1)"),
    (["--opt", "train.ema_decay=1.5"], "train.ema_decay must be in [0, 1]"),
])
def test_bad_training_settings_are_refused_before_any_work(trained, tmp_path, args, expected):
    cfg = trained.write("bad.yaml", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "cache"))
    assert expected in error_line(run_inprocess("main.py", "--config", cfg, *args, check=False))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_config_bounds_at_their_edges(tiny):
    for sections, ok in (({"diffusion": {"subset_timesteps_num": 99}}, True),
                         ({"diffusion": {"subset_timesteps_num": 100}}, False),
                         ({"diffusion": {"subset_timesteps_num": 100, "indexing": "consistent"}}, True),
                         ({"diffusion": {"subset_timesteps_num": 101, "indexing": "consistent"}}, False),
                         ({"diffusion": {"linear_start": 0.01, "linear_end": 0.01}}, False),
                         ({"eval": {"groups": {"nowhere": "near"}}}, False),
                         ({"eval": {"groups": {"gauss": "near"}}}, True)):
        if ok:
            load_config(tiny.write(**sections))
        else:
            with pytest.raises(UserError):
                load_config(tiny.write(**sections))


def test_zero_noise_draws_are_refused_when_the_config_loads(tiny):
    from errors import UserError
    from experiment.config import load_config
    with pytest.raises(UserError, match="eval.noise_draws must be positive, got 0"):
        load_config(tiny.write(eval={"noise_draws": 0}))


def test_a_value_in_a_message_is_kept_whole_up_to_the_limit_and_cut_after():
    from experiment.config import one_line_value
    exact = ["x" * 16] * 4  # its repr is 80 characters
    assert len(repr(exact)) == 80 and one_line_value(exact) == repr(exact)
    longer = ["x" * 17] * 4
    assert one_line_value(longer) == repr(longer)[:76] + " ..." and len(one_line_value(longer)) == 80


def test_backbone_layers_are_checked_against_the_backbones_taps(tiny):
    from errors import UserError
    from experiment.config import load_config
    with pytest.raises(UserError, match="backbone.layers must list taps of efficientnet-lite0 among 0..4, got \\[5\\]"):
        load_config(tiny.write(backbone={"name": "efficientnet-lite0", "input_size": 32, "layers": [5]}))
    assert load_config(tiny.write(backbone={"name": "efficientnet-lite0", "input_size": 32,
                                            "layers": [4]})).backbone.layers == [4]


def test_presets_name_openoods_near_and_far_sets():
    # OpenOOD v1.5's near and far sets, as its benchmark tables list them
    expected = {"cifar10": (["cifar100", "tin"], ["mnist", "svhn", "texture", "places365"]),
                "cifar100": (["cifar10", "tin"], ["mnist", "svhn", "texture", "places365"]),
                "imagenet200": (["ssb_hard", "ninco"], ["inaturalist", "textures", "openimage_o"]),
                "imagenet": (["ssb_hard", "ninco"], ["inaturalist", "textures", "openimage_o"])}
    release = config_to_dict(load_config(os.path.join(ROOT, "config", "Config.yaml")))
    for bench, (near, far) in expected.items():
        cfg = config_to_dict(load_config(os.path.join(ROOT, "config", f"openood_{bench}.yaml")))
        assert cfg["train"]["dataset"] == cfg["eval"]["dataset"] == f"openood:{bench}"
        assert list(cfg["eval"]["ood"]) == near + far
        assert all(cfg["eval"]["ood"][s] == f"openood:{bench}/{s}" for s in near + far)
        assert cfg["eval"]["groups"] == {**{s: "near" for s in near}, **{s: "far" for s in far}}
        for section in ("backbone", "lfdn", "diffusion"):
            assert cfg[section] == release[section], (bench, section)  # the release's method settings
        assert {k: v for k, v in cfg["train"].items() if k != "dataset"} == \
            {k: v for k, v in release["train"].items() if k != "dataset"}


def test_a_repeated_key_is_an_error_naming_the_key_and_both_lines(tiny, tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(open(tiny.write()).read() + "train:\n  epochs: 1\n")
    proc = run_inprocess("main.py", "--config", str(path), check=False)
    assert proc.returncode == 2
    assert "the key 'train' appears twice in one mapping (lines" in last(proc)
    lines = [i + 1 for i, x in enumerate(path.read_text().splitlines()) if x.startswith("train:")]
    assert f"lines {lines[0]} and {lines[1]}" in last(proc)


def test_an_empty_config_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    proc = run_inprocess("main.py", "--config", str(tmp_path / "empty.yaml"), check=False)
    assert proc.returncode == 2 and "is empty" in last(proc)


def test_an_alias_bomb_is_refused_in_one_short_line(tiny, tmp_path):
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i, name in enumerate("bcdefg"):
        prev = "abcdefg"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    # The anchors inside the value itself: eval.ood is a list of ever larger lists (9 ** 7 leaves).
    items = [x.split(": ", 1)[1] for x in levels]
    text = "eval:\n  ood:\n" + "".join(f"    - {x}\n" for x in items)
    (tmp_path / "bomb.yaml").write_text(text)
    proc = run_inprocess("main.py", "--config", str(tmp_path / "bomb.yaml"), check=False)
    assert proc.returncode == 2 and "eval.ood should be" in last(proc)
    assert len(last(proc)) < 300 and "\n" not in last(proc)  # the value shown bounded, never expanded whole


def test_a_repeated_k_is_refused_before_any_work(trained, tmp_path):
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--output_dir", str(tmp_path / "r"), "--baselines", "knn", "--knn_k", "1,1", check=False)
    assert proc.returncode == 2 and "eval.knn_k lists k = 1 more than once" in last(proc)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ YAML as users write it (issue 35, 36)

def test_merge_keys_work_and_repeated_keys_are_still_refused(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("defaults: &common\n  seed: 7\n  epochs: 9\n"
                    "train:\n  <<: *common\n  dataset: digits\n  epochs: 4\n"
                    "eval:\n  <<: {seed: 3}\n")
    with pytest.raises(UserError, match="unknown key 'defaults'"):
        load_config(str(path))  # merge keys read; the anchor's own key is still checked as a key
    path.write_text("train: &common\n  seed: 7\n  epochs: 9\n  dataset: digits\n"
                    "eval:\n  <<: {seed: 3}\n  dataset: digits\n")
    cfg = load_config(str(path))
    assert cfg.train.seed == 7 and cfg.eval.seed == 3 and cfg.eval.dataset == "digits"
    over = tmp_path / "over.yaml"
    over.write_text("train:\n  <<: [{seed: 7, epochs: 9}, {batch_size: 8}]\n  epochs: 4\n  dataset: digits\n")
    cfg = load_config(str(over))
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.batch_size) == (7, 4, 8)  # a key it brings, set again
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  <<: {seed: 7}\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(UserError, match="the key 'epochs' appears twice in one mapping"):
        load_config(str(twice))


def test_a_key_repeated_in_a_flow_mapping_on_one_line_is_refused(tiny, tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(open(tiny.write()).read() + "eval: {seed: 1, seed: 2}\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert "appears twice" in str(e.value)  # the 'eval' section twice, or 'seed' twice: never the last silently
    path.write_text("train: {dataset: digits, epochs: 1, epochs: 2}\n")
    with pytest.raises(UserError, match=r"the key 'epochs' appears twice in one mapping \(line 1, columns \d+ and \d+\)"):
        load_config(str(path))


def test_a_key_a_config_file_leaves_out_takes_the_release_value_of_config_yaml():
    """The settings' defaults are config/Config.yaml's (the release's), every one, except two batch sizes
    (speed settings: features and scores agree to float rounding) and the near/far groups, which the file adds."""
    import dataclasses

    def flat(d, prefix=""):
        for k, v in d.items():
            if dataclasses.is_dataclass(v):
                yield from flat(vars(v), f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    defaults = dict(flat(vars(Config())))
    release = dict(flat(vars(load_config(os.path.join(ROOT, "config", "Config.yaml")))))
    assert set(defaults) == set(release) and len(defaults) > 40
    differ = {k: (defaults[k], release[k]) for k in defaults if defaults[k] != release[k]}
    assert differ == {"extract_batch_size": (64, 32), "eval.batch_size": (64, 256),
                      "eval.groups": ({}, release["eval.groups"])}
    assert defaults["eval.ood"] == release["eval.ood"] and defaults["lfdn.num_res_blocks"] == 16


def test_an_unhashable_key_is_yamls_own_one_line_error(tmp_path):
    path = tmp_path / "key.yaml"
    path.write_text("train:\n  epochs: 2\n  ? [1, 2]\n  : 3\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(e.value) == f"{path} is not valid YAML: line 3, column 5: found unhashable key"


def test_an_override_that_is_not_valid_yaml_is_taken_as_written(tiny):
    cfg = load_config(tiny.write())
    for text in ("runs/[odd", "[odd", "{a: 1, a: 2}", "a: b: c"):  # YAML errors, a repeated key: the text itself
        override(cfg, "output_dir", text)
        assert cfg.output_dir == text
    override(cfg, "train.epochs", "7")
    assert cfg.train.epochs == 7


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3E-5", 3e-5), ("1.0e-4", 1e-4), (".5e-3", 5e-4),
                                        ("2e3", 2000.0), ("5", 5.0)])
def test_numbers_are_read_as_yaml_1_2_and_every_user_writes_them(tiny, tmp_path, text, value):
    path = tmp_path / "lr.yaml"
    path.write_text(open(tiny.write()).read().replace("lr: 0.001", f"lr: {text}"))
    assert load_config(str(path)).train.lr == value
    cfg = load_config(tiny.write())
    override(cfg, "train.lr", text)  # --opt train.lr=1e-4 reads it the same way
    assert cfg.train.lr == value


def test_a_yaml_error_names_its_cause_and_place_on_one_line(tmp_path):
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("train:\n\tepochs: 3\n")
    with pytest.raises(UserError) as e:
        load_config(str(tabs))
    line = str(e.value)
    assert "line 2, column 1" in line and "'\\t'" in line and "indent with spaces" in line and "\n" not in line
    tag = tmp_path / "tag.yaml"
    tag.write_text("train:\n  epochs: !!python/object:os.system 3\n")
    with pytest.raises(UserError, match=r"line 2, column 11: .*constructor for the tag 'tag:yaml.org,2002:python/object"):
        load_config(str(tag))


def test_a_preset_is_an_overlay_on_its_base(tmp_path, tiny):
    base = tmp_path / "base.yaml"
    base.write_text(open(tiny.write()).read())
    (tmp_path / "sub").mkdir()
    over = tmp_path / "sub" / "over.yaml"
    over.write_text("base: ../base.yaml\ntrain:\n  epochs: 9\neval:\n  ood: {only: digits}\n")
    cfg = load_config(str(over))
    assert cfg.train.epochs == 9 and cfg.train.dataset == "digits"  # a section merges key by key
    assert cfg.eval.ood == {"only": "digits"}  # a value (a mapping of sets) replaces whole
    assert cfg.lfdn.model_channels == 64  # untouched sections come from the base
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="an overlay on itself"):
        load_config(str(loop))
    missing = tmp_path / "orphan.yaml"
    missing.write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"config file '.*nowhere.yaml' does not exist"):
        load_config(str(missing))


@pytest.mark.parametrize("sections,expected", [
    ({"train": {"cache_features": "yes"}}, "train.cache_features should be true/false, got 'yes'"),
    ({"train": {"weight_decay": "fast"}}, "train.weight_decay should be a number, got 'fast'"),
    ({"train": {"weight_decay": True}}, "train.weight_decay should be a number, got True"),
    ({"train": {"lr": "fast"}}, "train.lr should be a number or null, got 'fast'"),
    ({"train": {"epochs": 2.5}}, "train.epochs should be an integer, got 2.5"),
    ({"backbone": {"name": 5}}, "backbone.name should be a string, got 5"),
    ({"train": {"betas": 0.9}}, "train.betas should be a list of a number, got 0.9"),
    ({"train": {"betas": [0.9, "x"]}}, "train.betas[1] should be a number, got 'x'"),
    ({"eval": {"ood": ["gauss"]}}, "eval.ood should be a mapping, got ['gauss']"),
    ({"train": {"subset": "all"}}, "train.subset should be an integer or null, got 'all'"),
    ({"backbone": {"layers": [0, "a"]}}, "backbone.layers[1] should be an integer, got 'a'"),
    ({"backbone": {"layers": 2}}, "backbone.layers should be a list of an integer or null, got 2"),
    ({"train": 3}, "train must be a mapping, got int"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
    ({"eval": {"knn_k": [1, 0]}}, "eval.knn_k must be a list of positive integers, got [1, 0]"),
    ({"eval": {"knn_k": []}}, "eval.knn_k must be a list of positive integers, got []"),
    ({"backbone": {"name": "vgg16"}}, "backbone.name: unknown backbone 'vgg16'"),
])
def test_a_value_of_the_wrong_type_or_range_in_the_file_is_named_with_what_it_should_be(tiny, sections, expected):
    with pytest.raises(UserError) as e:
        load_config(tiny.write(**sections))
    assert expected in str(e.value)


def test_a_file_that_is_not_a_mapping_not_utf8_or_based_on_a_non_name_is_refused_in_one_line(tmp_path):
    cases = {"list.yaml": (b"- 1\n- 2\n", "the file must be a mapping, got list"),
             "latin1.yaml": ("device: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (invalid continuation byte"),
             "base.yaml": (b"base: [a.yaml]\n", "base must name a YAML file, got ['a.yaml']"),
             "bell.yaml": (b"train:\n  epochs: 1\x07\n",  # the reader's error: no line and column, its cause first
                           "is not valid YAML: unacceptable character #x0007: special characters are not allowed")}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as e:
            load_config(str(tmp_path / name))
        assert expected in str(e.value) and "\n" not in str(e.value), name
