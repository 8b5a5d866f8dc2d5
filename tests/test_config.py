"""Config precedence (flag > env > file > default) and errors that name the key."""

import pytest

from sloth_daemon.config import ConfigError, load_config


def test_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('port = 9001\nhost = "127.0.0.2"\n[train]\nsteps = 11\nlearning_rate = 0.01\n')
    env = {"SLOTH_PORT": "9002", "SLOTH_TRAIN_STEPS": "12"}
    cfg = load_config(f, env=env, overrides={"port": 9003, "model": None})
    assert cfg.port == 9003  # flag
    assert cfg.train.steps == 12  # env over file
    assert cfg.train.learning_rate == 0.01  # file over default
    assert cfg.host == "127.0.0.2"
    assert cfg.model is None and cfg.train.batch_size == 8  # defaults
    assert cfg.embedded.quantization == "none"
    assert load_config(env={"SLOTH_EMBEDDED_QUANTIZATION": "nf4"}).embedded.quantization == "nf4"


def test_env_parsing_and_state_dir(tmp_path):
    cfg = load_config(env={"SLOTH_STATE_DIR": str(tmp_path / "s"), "SLOTH_SCHEDULE_ENABLED": "false",
                           "SLOTH_TRAIN_TARGET_MODULES": '["q_proj"]', "SLOTH_API_KEY": "secret"})
    assert cfg.state_dir == (tmp_path / "s").resolve()
    assert cfg.schedule.enabled is False
    assert cfg.train.target_modules == ["q_proj"]
    assert cfg.api_key == "secret"
    assert cfg.replay_db == cfg.state_dir / "replay.db"


def test_config_file_from_env(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("port = 9100\n")
    assert load_config(env={"SLOTH_CONFIG": str(f)}).port == 9100


@pytest.mark.parametrize("env,needle", [
    ({"SLOTH_TRAIN_STEPS": "0"}, "train.steps"),
    ({"SLOTH_PORT": "70000"}, "port"),
    ({"SLOTH_MIX_NEW": "0", "SLOTH_MIX_REPLAY": "0", "SLOTH_MIX_ANCHOR": "0"}, "mix"),
    ({"SLOTH_ENGINE": "tgi"}, "engine"),
    ({"SLOTH_EMBEDDED_QUANTIZATION": "int8"}, "embedded.quantization"),
])
def test_errors_name_the_key(env, needle):
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    assert needle in str(e.value)


def test_unknown_key_and_bad_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(f, env={})
    f.write_text("port = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
