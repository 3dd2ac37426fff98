"""ResNet-18 fine-tuned on an ImageFolder directory from torchvision's ImageNet weights.

    dlfx train --config configs/finetune_resnet_folder.py --config.data.path=DATA \
        --config.init_from.path=resnet18.safetensors

DATA holds train/<class>/*.jpg and val/<class>/*.jpg; the weights file is torchvision's resnet18 state dict
saved with safetensors (see README "Transfer learning"). Inputs get torchvision's ImageNet preprocessing
(random resized crop + flip for training, resize + center crop for eval, ImageNet mean/std on the device).
"""

from dlfx.config import base_config


def get_config():
    """ResNet-18 (ImageNet stem, width 64) from torchvision weights, a fresh head, 224-pixel crops."""
    c = base_config()
    c.model.name = "resnet18"
    c.data.name = "image_folder"
    c.data.path = ""  # required: the ImageFolder root
    c.data.image_size = 224
    c.data.normalize = "imagenet"  # what torchvision-pretrained ResNets expect
    c.data.batch_size = 64
    c.data.workers = 2  # JPEG decode + augmentation off the training thread
    c.init_from.path = ""  # required: torchvision resnet18 weights (.safetensors or .pt)
    c.init_from.format = "torchvision_resnet"
    c.init_from.skip = ("head/.*",)  # the new task's classes
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.01
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 1e-4
    c.train.epochs = 10
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.keep_best = "accuracy"
    return c
