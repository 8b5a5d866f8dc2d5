"""How much an update trains: batches from the data (epochs over the new examples, clamped), or a fixed count, and
the tokens per optimizer step by device."""

import pytest

from sloth_daemon.config import ConfigError, TrainConfig, load_config
from sloth_daemon.trainer.plan import GPU_STEP_TOKENS, planned_steps, step_tokens


def test_steps_follow_the_new_examples_within_bounds():
    train = TrainConfig(epochs=2, min_steps=60, max_steps=1000)
    assert planned_steps(train, 5, 4) == 60            # a few facts: the floor (they need repeats)
    assert planned_steps(train, 500, 4) == 250         # 2 passes over 500 examples, 4 new ones per batch
    assert planned_steps(train, 501, 4) == 251         # rounded up: every example gets its passes
    assert planned_steps(train, 10_000, 4) == 1000     # the ceiling
    assert planned_steps(TrainConfig(epochs=0.5, min_steps=1), 100, 8) == 7


def test_a_fixed_step_count_wins():
    assert planned_steps(TrainConfig(steps=120), 5000, 4) == 120
    assert planned_steps(TrainConfig(steps=3), 1, 1) == 3


def test_tokens_per_step_by_device_and_setting():
    assert step_tokens(TrainConfig(), "cuda") == GPU_STEP_TOKENS
    assert step_tokens(TrainConfig(), "cuda:1") == GPU_STEP_TOKENS
    assert step_tokens(TrainConfig(), "cpu") == 0
    assert step_tokens(TrainConfig(step_tokens=2048), "cpu") == 2048
    assert step_tokens(TrainConfig(pack=False), "cuda") == 0  # merging steps needs packing


def test_config_keys_from_the_environment():
    cfg = load_config(env={"SLOTH_TRAIN_STEP_TOKENS": "8192", "SLOTH_TRAIN_EPOCHS": "3", "SLOTH_TRAIN_WARM": "false"})
    assert (cfg.train.step_tokens, cfg.train.epochs, cfg.train.warm, cfg.train.steps) == (8192, 3.0, False, None)
    assert load_config(env={"SLOTH_TRAIN_STEP_TOKENS": "auto"}).train.step_tokens == "auto"
    with pytest.raises(ConfigError, match="train.step_tokens"):
        load_config(env={"SLOTH_TRAIN_STEP_TOKENS": "-1"})
