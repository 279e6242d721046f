"""Bad input is refused before any process starts, with one line that says what to change."""
import pytest
import yaml

from dpdist.config import ConfigError, dump_config, load_config, parse_overrides


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.steps=5", "privacy.seed=123", "parallel.data=2", "privacy.noise_multiplier=1.5",
                             "privacy.target_epsilon=null", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 5 and cfg.privacy.seed == 123 and cfg.parallel.data == 2
    assert cfg.privacy.noise_multiplier == 1.5 and cfg.train.betas == (0.8, 0.9)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/default.yaml", ["train.steps=7"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key train.stepz"),
    ("privacy.clip_norm=-1", "privacy.clip_norm must be a positive number"),
    ("privacy.sample_rate=1.5", "privacy.sample_rate must be in (0, 1]"),
    ("privacy.delta=2", "privacy.delta must be in (0, 1)"),
    ("model.d_model=130", "must be a multiple of model.n_heads"),
    ("model.norm=batchnorm", "model.norm must be one of layernorm, rmsnorm"),
    ("model.reattention=true", "model.reattention is now reattention.enabled"),
    ("reattention.frequency_noise=0", "reattention.frequency_noise > 0"),
    ("data.seq_len=512", "exceeds model.max_seq_len"),
    ("privacy.clipping=fancy", "privacy.clipping must be one of"),
    ("train.steps=abc", "train.steps expects int"),
    ("data.path=/no/such/file.txt", "does not exist"),
])
def test_bad_values_are_refused_with_a_one_line_message(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/default.yaml", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_noise_needs_sigma_or_target_and_not_both():
    with pytest.raises(ConfigError, match="not both"):
        load_config("configs/default.yaml", ["privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="set privacy.noise_multiplier"):
        load_config("configs/default.yaml", ["privacy.target_epsilon=null"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="must be dotted"):
        parse_overrides(["steps=5"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_a_run_written_with_reattention_keys_under_model_still_loads(tmp_path):
    """Run directories from before the reattention section name its keys model.reattention*; a resume,
    eval or export of such a run reads that config.yaml."""
    cfg = load_config("configs/default.yaml", ["reattention.enabled=true", "reattention.variance_scale=0.5",
                                               "reattention.layers=0", "reattention.frequency_noise=4"])
    old = cfg.to_dict()
    section = old.pop("reattention")
    old["model"].update(reattention=section["enabled"], reattention_lambda=section["variance_scale"],
                        reattention_layers=section["layers"], reattention_frequencies=section["frequencies"],
                        reattention_frequency_noise=section["frequency_noise"])
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "old.yaml").to_dict() == cfg.to_dict()
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({**old, "reattention": {"enabled": False}}))
    with pytest.raises(ConfigError, match="keep only the reattention section"):
        load_config(tmp_path / "both.yaml")
