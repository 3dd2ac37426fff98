"""GPT-2 small (124M with GPT-2's vocabulary): 12 layers x 768, 12 heads, 1024 context, bfloat16 compute.

The accelerator benchmark shape (`python -m benchmarks.run --models gpt124m`). On the built-in text the
vocabulary is the corpus's characters (~85M parameters); too large to train on a laptop CPU.
"""

from dlfx.config import base_config


def get_config():
    """GPT-2-small shape on the built-in text; bf16 compute, fused attention (cuDNN on a GPU)."""
    c = base_config()
    c.model.name = "gpt"
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.embed_dim = 768
    c.model.max_len = 1024
    c.model.dropout_rate = 0.0  # no dropout: attention stays on the fused kernel in training too
    c.model.attention = "auto"
    c.data.name = "text"
    c.data.path = ""
    c.data.seq_len = 1024
    c.data.batch_size = 32
    c.precision.compute_dtype = "bfloat16"  # float32 parameters and optimizer state
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 6e-4
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.optimizer.b2 = 0.95
    c.train.steps = 5000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    return c
