"""Config loading, overrides, validation errors and YAML round trips."""

from pathlib import Path

import pytest
import yaml

import train_transformer
import train_vqgan
from transformer.config import Stage2Config
from utils.config import (
    ConfigError,
    apply_overrides,
    config_diff,
    describe,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from vqgan.config import Stage1Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file():
    cfg = load_config(Stage1Config, None)
    assert cfg.model.ch_mult == (1, 2, 2)
    assert cfg.train.betas == (0.5, 0.9)


def test_yaml_values_are_typed(tmp_path):
    path = write(tmp_path, {"model": {"ch_mult": [1, 1, 2, 2, 4], "codebook_dim": 8}, "train": {"lr": 1}})
    cfg = load_config(Stage1Config, path)
    assert cfg.model.ch_mult == (1, 1, 2, 2, 4)
    assert cfg.model.codebook_dim == 8
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_dotted_overrides_parse_to_field_types(tmp_path):
    path = write(tmp_path, {"train": {"lr": 1e-3}})
    cfg = load_config(Stage1Config, path, ["model.codebook_size=1024", "train.lr=1e-4", "model.l2_norm=true",
                                           "data.root=/data/x", "model.attn_resolutions=[16,8]",
                                           "model.codebook_dim=null"])
    assert cfg.model.codebook_size == 1024
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.l2_norm is True
    assert cfg.data.root == "/data/x"
    assert cfg.model.attn_resolutions == (16, 8)
    assert cfg.model.codebook_dim is None


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.codebok_size.*Did you mean 'model\.codebook_size'"):
        load_config(Stage1Config, None, ["model.codebok_size=3"])
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*'train'"):
        from_dict(Stage1Config, {"trian": {"lr": 1.0}})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps.*integer"):
        load_config(Stage1Config, None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"model\.l2_norm.*true or false"):
        load_config(Stage1Config, None, ["model.l2_norm=3"])
    with pytest.raises(ConfigError, match=r"loss\.rec_loss.*'l1'"):
        load_config(Stage1Config, None, ["loss.rec_loss=l3"])
    with pytest.raises(ConfigError, match=r"train\.betas.*2 values"):
        load_config(Stage1Config, None, ["train.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"model\.ch_mult.*list"):
        load_config(Stage1Config, None, ["model.ch_mult=3"])
    with pytest.raises(ConfigError, match=r"train\.lr.*number"):
        load_config(Stage1Config, None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"data\.root.*string"):
        load_config(Stage1Config, None, ["data.root=[1]"])


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["lr=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Stage1Config, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Stage1Config, bad)
    with pytest.raises(ConfigError, match="mapping of keys"):
        from_dict(Stage1Config, {"model": 3})
    with pytest.raises(ConfigError, match="mapping of sections"):
        from_dict(Stage1Config, [1, 2])


def test_save_round_trips(tmp_path):
    cfg = load_config(Stage2Config, None, ["sample.top_k=50", "transformer.n_layer=2"])
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    assert load_config(Stage2Config, out) == cfg
    assert to_dict(cfg)["sample"]["top_k"] == 50


def test_config_diff_lists_changed_keys():
    a = to_dict(load_config(Stage1Config, None))
    b = to_dict(load_config(Stage1Config, None, ["train.lr=0.5"]))
    assert config_diff(a, b) == ["train.lr: 0.0002 -> 0.5"]
    assert config_diff(a, a) == []


def test_describe_lists_every_key(capsys):
    table = describe(Stage1Config)
    for section, values in to_dict(Stage1Config()).items():
        for key in values:
            assert f"`{section}.{key}`" in table
    with pytest.raises(SystemExit) as exit_info:
        train_transformer.main(["--describe-config"])
    assert exit_info.value.code == 0
    assert "`transformer.pkeep`" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_vqgan.main(["--describe-config"])
    out = capsys.readouterr().out
    assert "`model.codebook_dim`" in out and "`train.disc_lr`" in out and "`transformer." not in out


def test_stage2_offers_only_what_it_honours():
    for key in ("train.disc_lr=1e-4", "train.channels_last=true"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(Stage2Config, None, [key])
    assert load_config(Stage2Config, None, ["train.ema_decay=0.999"]).train.ema_decay == 0.999


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cls = Stage2Config if "transformer" in path.name else Stage1Config
    load_config(cls, path)


def test_validate_rejects_impossible_values():
    def check(cls, overrides, pattern):
        with pytest.raises(ConfigError, match=pattern):
            load_config(cls, None, overrides).validate()

    check(Stage1Config, ["data.image_size=30", "model.ch_mult=[1,2,2]"], r"not divisible by the downsample factor 4")
    check(Stage1Config, ["model.codebook_size=1"], "at least 2")
    check(Stage1Config, ["train.lr=-1"], "train.lr must be positive")
    check(Stage1Config, ["data.channels=2"], "1 or 3")
    check(Stage2Config, ["transformer.n_embd=30", "transformer.n_head=4"], "divisible")
    check(Stage2Config, ["transformer.pkeep=1.5"], "pkeep")
    check(Stage2Config, ["transformer.condition_dropout=1"], r"transformer.condition_dropout must be in \[0, 1\)")
    assert load_config(Stage2Config, None).validate() == []


def test_validate_warns_when_gan_never_starts():
    cfg = load_config(Stage1Config, None, ["train.max_steps=100", "loss.disc_start=100"])
    (warning,) = cfg.validate()
    assert "never switches on" in warning
    assert load_config(Stage1Config, None, ["train.max_steps=100", "loss.disc_start=50"]).validate() == []
