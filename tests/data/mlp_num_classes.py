"""A tiny MLP config whose model.num_classes is set by the config argument (for error tests)."""

from dlfx.config import base_config


def get_config(arg="10"):
    """Digits MLP with an explicit num_classes."""
    c = base_config()
    c.model.name = "mlp"
    c.model.num_classes = int(arg)
    c.data.name = "digits"
    c.data.batch_size = 64
    c.train.steps = 2
    return c
