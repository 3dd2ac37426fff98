"""Regression (generated offline): recover each noisy sine wave's amplitude, frequency and offset."""

from dlfx.config import base_config


def get_config():
    """A 1-D CNN on 4096 train / 1024 test waves of 64 steps; task `regression` with a Huber loss."""
    c = base_config()
    c.data.name = "sines"
    c.data.batch_size = 128
    c.task.name = "regression"
    c.task.loss_name = "huber"
    c.model.name = "cnn1d"
    c.model.features = (32, 64, 64)
    c.model.kernel_size = 5
    c.model.stride = 2
    c.model.use_batch_norm = True
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 1e-4
    c.train.steps = 3000
    c.train.eval_every = 1000
    c.train.log_every = 100
    return c
