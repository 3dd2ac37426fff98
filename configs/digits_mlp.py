"""Two-layer MLP with dropout on scikit-learn's 8x8 digits."""

from dlfx.config import base_config


def get_config():
    """A plain MLP baseline for the digits CNN."""
    c = base_config()
    c.model.name = "mlp"
    c.model.hidden_dims = (256, 256)
    c.model.dropout_rate = 0.2
    c.data.name = "digits"
    c.data.batch_size = 128
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 1e-4
    c.train.epochs = 60
    c.train.eval_every = 200
    # the whole run is 660 steps of ~1 ms: a mid-run save (~8 ms blocking, ~50 ms of CPU until committed
    # on 2 cores) would cost ~5 % of it, so it saves at the end (and on SIGTERM) only
    c.train.checkpoint_every = 0
    c.train.steps_per_call = 10  # ~1 ms steps: one call per 10 steps hides the per-call host work
    return c
