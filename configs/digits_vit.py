"""A small ViT on 8x8 digits: 2x2 patches (16 tokens + cls), 4 layers."""

from dlfx.config import base_config


def get_config():
    """ViT with dropout and stochastic depth; AdamW with warmup, label smoothing."""
    c = base_config()
    c.model.name = "vit"
    c.model.patch_size = 2
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.embed_dim = 64
    c.model.dropout_rate = 0.1
    c.model.drop_path_rate = 0.1
    c.data.name = "digits"
    c.data.batch_size = 128
    c.data.crop_padding = 1
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.05
    c.optimizer.clip_norm = 1.0
    c.loss.label_smoothing = 0.1
    c.train.epochs = 100
    c.train.eval_every = 250
    c.train.checkpoint_every = 500
    return c
