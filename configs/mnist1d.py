"""MNIST-1D (generated offline): `configs/mnist1d.py:mlp` or `configs/mnist1d.py:cnn`."""

from dlfx.config import base_config

MODELS = ("mlp", "cnn")


def get_config(arg=None):
    """Model chosen by the config argument (default cnn); 4000 train / 1000 test sequences of 40 steps."""
    model = arg or "cnn"
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    c = base_config()
    c.data.name = "mnist1d"
    c.data.num_samples = 5000  # 80 % train, 20 % test, as in the published data set
    c.data.batch_size = 128
    c.optimizer.name = "adamw"
    c.optimizer.schedule = "cosine"
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    if model == "mlp":
        c.model.name = "mlp"
        c.model.hidden_dims = (100, 100)
        c.optimizer.learning_rate = 1e-3
        c.optimizer.weight_decay = 1e-4
        c.train.steps = 4000
    else:
        c.model.name = "cnn1d"
        c.model.features = (32, 32, 32)
        c.model.kernel_size = 5
        c.model.stride = 2
        c.optimizer.learning_rate = 3e-3
        c.optimizer.weight_decay = 1e-4
        c.train.steps = 4000
    return c
