"""Character-level GPT on CPython's own documentation prose (offline)."""

from dlfx.config import base_config


def get_config():
    """A 4-layer, 128-wide GPT over 128-character windows; `dlfx sample --workdir RUN --prompt "def "`."""
    c = base_config()
    c.model.name = "gpt"
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.embed_dim = 128
    c.model.max_len = 256  # room for the prompt plus generated text when sampling
    c.model.dropout_rate = 0.1
    c.data.name = "text"
    c.data.path = ""
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.optimizer.b2 = 0.99
    c.train.steps = 1500  # ~11 minutes on 2 CPU cores
    c.train.eval_every = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    return c
