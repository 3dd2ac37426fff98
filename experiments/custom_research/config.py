"""A config using a model, data factory and task from this folder: `dlfx train --config experiments/custom_research/config.py`."""

from dlfx.config import base_config


def get_config():
    c = base_config()
    c.model.name = "nets:Denoiser"  # module:attribute, found beside this config file
    c.model.features = 32
    c.data.name = "data:noisy_waves"
    c.data.noise = 0.3
    c.task.name = "tasks:Denoising"
    c.data.batch_size = 64
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.train.steps = 1500
    c.train.eval_every = 500
    c.train.log_every = 100
    return c
