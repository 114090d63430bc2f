"""The registry and the config loader: strict names, keys and types, clear messages."""

from __future__ import annotations

from typing import List, Optional

import pytest

from fedrec.utilities import registry
from fedrec.utilities.config import ConfigError, apply_overrides, load_config, load_yaml
from fedrec.utilities.registry import ConfigTypeError, RegistryError


@registry.load("test_widget", "basic")
class Widget:
    def __init__(self, size: int, tags: Optional[List[str]] = None, scale: float = 1.0) -> None:
        self.size, self.tags, self.scale = size, tags, scale


def test_construct_passes_config_and_code_kwargs():
    widget = registry.construct("test_widget", {"name": "basic", "size": 3}, scale=2.5)
    assert (widget.size, widget.scale) == (3, 2.5)
    assert registry.lookup("test_widget", "basic") is Widget
    assert registry.lookup("test_widget", {"name": "basic"}) is Widget


def test_unknown_name_lists_known_names():
    with pytest.raises(RegistryError, match=r"unknown test_widget 'nope'; known test_widget names: basic"):
        registry.lookup("test_widget", "nope")
    with pytest.raises(RegistryError, match="known optimizer names: .*sgd"):
        registry.lookup("optimizer", "sgdd")


def test_duplicate_name_is_an_error():
    with pytest.raises(RegistryError, match="already registered"):
        @registry.load("test_widget", "basic")
        class Other:  # noqa: F841
            pass


def test_unknown_config_key_is_named():
    with pytest.raises(RegistryError, match=r"does not take config key\(s\) \['colour'\]"):
        registry.construct("test_widget", {"name": "basic", "size": 1, "colour": "red"})


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigTypeError, match="'size' expects int, got 'big'"):
        registry.construct("test_widget", {"name": "basic", "size": "big"})
    with pytest.raises(ConfigTypeError, match="'tags'"):
        registry.construct("test_widget", {"name": "basic", "size": 1, "tags": 5})


def test_pydantic_train_config_errors_name_the_key():
    with pytest.raises(ConfigTypeError, match="either num_epochs or num_batches"):
        registry.construct("train_config", {"name": "dlrm_std", "num_epochs": 1, "num_batches": 5})
    with pytest.raises(ConfigTypeError, match="unknown key 'batchsize'"):
        registry.construct("train_config", {"name": "dlrm_std", "batchsize": 5})
    with pytest.raises(ConfigTypeError, match="key 'batch_size'"):
        registry.construct("train_config", {"name": "dlrm_std", "batch_size": "many"})


def test_yaml_safe_load_and_errors(tmp_path):
    good = tmp_path / "c.yml"
    good.write_text("model:\n  name: dlrm\ntrain:\n  config: {batch_size: 128}\n")
    assert load_yaml(good)["model"]["name"] == "dlrm"
    unsafe = tmp_path / "unsafe.yml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="unsafe.yml.*not valid YAML"):
        load_yaml(unsafe)
    broken = tmp_path / "broken.yml"
    broken.write_text("model:\n  name: [dlrm\n")
    with pytest.raises(ConfigError, match=r"broken.yml line \d+"):
        load_yaml(broken)
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match=r"unknown top-level section\(s\) \['modle'\]"):
        load_yaml(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yml")


def test_overrides_flags_and_set(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("train:\n  config: {name: dlrm_std, batch_size: 128}\n")
    config = load_config(path, sets=["train.config.batch_size=256", "fl.num_rounds=3",
                                     "model.arch_mlp_bot=[13, 8, 4]"],
                         flags={"eval_every_n": 7, "num_epochs": None})
    assert config["train"]["config"]["batch_size"] == 256
    assert config["train"]["config"]["eval_every_n"] == 7
    assert "num_epochs" not in config["train"]["config"]
    assert config["fl"]["num_rounds"] == 3
    assert config["model"]["arch_mlp_bot"] == [13, 8, 4]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, sets=["train.config.batch_size"])
    with pytest.raises(ConfigError, match="unknown flag --bogus"):
        apply_overrides({}, flags={"bogus": 1})


def test_shipped_configs_load_and_validate():
    from fedrec.federated.config import fl_config_from

    for name in ("configs/dlrm.yml", "configs/dlrm_small.yml", "configs/dlrm_fl.yml"):
        config = load_config(name)
        registry.construct("train_config", config["train"]["config"])
        registry.lookup("model", config["model"])
    from fedrec.federated.client_runner import algorithm_config

    fl = fl_config_from(load_config("configs/dlrm_fl.yml"))
    assert fl.fl_algo["name"] == "fed_adagrad" and fl.num_workers == 1000
    algorithm_config(registry.lookup("fl_algo", fl.fl_algo), fl.fl_algo)  # its keys are valid
    reference = load_config("configs/dlrm.yml")["model"]
    assert reference["arch_mlp_bot"] == [13, 512, 256, 64, 16]
    assert reference["arch_mlp_top"] == [512, 256, 1]
