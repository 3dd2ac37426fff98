"""A variational autoencoder on the 8x8 digits: the `autoencoder` task with `kl_weight` = 1 (the ELBO)."""

from dlfx.config import base_config


def get_config():
    """MLP encoder/decoder with an 8-dimensional Gaussian code; Bernoulli (bce) reconstruction of pixels."""
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 128
    c.model.name = "autoencoder"
    c.model.latent_dim = 8
    c.model.hidden_dims = (256, 128)
    c.task.name = "autoencoder"
    c.task.kl_weight = 1.0
    c.task.reconstruction = "bce"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
    c.train.steps = 4000
    c.train.eval_every = 1000
    c.train.log_every = 100
    return c
