"""Character-level LSTM language model on CPython's own documentation prose (offline)."""

from dlfx.config import base_config


def get_config():
    """Two-layer LSTM, 256 units; `dlfx sample --workdir RUN` generates text afterwards."""
    c = base_config()
    c.model.name = "lstm"
    c.model.hidden_dim = 256
    c.model.num_layers = 2
    c.model.embed_dim = 64
    c.model.dropout_rate = 0.1
    c.data.name = "text"  # path='' uses pydoc_data.topics; set data.path to train on your own file
    c.data.path = ""
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.clip_norm = 1.0
    c.train.steps = 1500
    c.train.eval_every = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    return c
