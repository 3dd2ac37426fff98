"""LeNet-style CNN with batch norm on scikit-learn's 8x8 digits: the default dlfx experiment."""

from dlfx.config import base_config


def get_config():
    """~98 % test accuracy in well under two minutes on a laptop CPU."""
    c = base_config()
    c.seed = 0
    c.model.name = "cnn"
    c.model.features = (32, 64)
    c.model.hidden_dim = 128
    c.model.dropout_rate = 0.1
    c.data.name = "digits"
    c.data.batch_size = 128
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 1e-4
    c.train.epochs = 60  # 11 steps per epoch at batch 128
    c.train.eval_every = 200
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    return c
