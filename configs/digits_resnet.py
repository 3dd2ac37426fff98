"""ResNet-18 (small stem, narrow) with batch norm and crop augmentation on 8x8 digits."""

from dlfx.config import base_config


def get_config():
    """ResNet-18 with the CIFAR-style stem; random crops with 1-pixel padding, no flips (digits are not symmetric)."""
    c = base_config()
    c.model.name = "resnet18"
    c.model.width = 32
    c.model.stem = "cifar"
    c.model.zero_init_last_bn = True
    c.data.name = "digits"
    c.data.batch_size = 128
    c.data.crop_padding = 1
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.learning_rate = 0.1
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 5e-4
    c.loss.label_smoothing = 0.1
    c.train.epochs = 40
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    return c
