"""MNIST-1D (generated offline): `configs/mnist1d.py:MODEL`, MODEL in mlp | cnn | gru | resnet | transformer."""

from dlfx.config import base_config

MODELS = ("mlp", "cnn", "gru", "resnet", "transformer")


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
    c.optimizer.weight_decay = 1e-4
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.steps = 4000
    if model == "mlp":  # the paper's MLP is 100-100 without dropout; it overfits 4000 examples (~60-65 %)
        c.model.name = "mlp"
        c.model.hidden_dims = (256, 256)
        c.model.dropout_rate = 0.3
        c.optimizer.learning_rate = 1e-3
    elif model == "cnn":
        c.model.name = "cnn1d"
        c.model.features = (32, 32, 32)
        c.model.kernel_size = 5
        c.model.stride = 2
        c.optimizer.learning_rate = 3e-3
    elif model == "gru":
        c.model.name = "gru"
        c.model.hidden_dim = 128
        c.model.num_layers = 1
        c.optimizer.learning_rate = 3e-3
        c.optimizer.clip_norm = 1.0
        c.train.steps = 3000
    elif model == "resnet":  # a narrow 1-D ResNet-18 with the small stem
        c.model.name = "resnet18"
        c.model.width = 32
        c.model.stem = "cifar"
        c.optimizer.learning_rate = 3e-3
        c.optimizer.warmup_steps = 100
        c.train.steps = 1500
    else:
        c.model.name = "transformer"
        c.model.num_layers = 4
        c.model.num_heads = 4
        c.model.embed_dim = 64
        c.model.max_len = 40
        c.model.dropout_rate = 0.1
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 200
        c.optimizer.clip_norm = 1.0
        c.train.steps = 2500
    return c
