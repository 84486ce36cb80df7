"""Sizes past which a model description or a training config is refused before anything is allocated.

Each bound sits far above every published ViT (ViT-22B: width 6144, 48 blocks, 48 heads; images
of at most a few thousand pixels), so no real model meets them, while a file or a config that lies
about its size is refused in one sentence instead of growing memory until the kernel steps in.
"""

MAX_PATCH_SIZE = 64  # pixels per patch side
MAX_IMG_SIZE = 4096  # pixels per image side, at training and in a model's metadata
MAX_EMBED_DIM = 8192  # encoder and predictor width
MAX_DEPTH = 256  # blocks of the encoder, predictor or aggregation head
MAX_HEADS = 256
MAX_BATCH_SIZE = 65536  # global batch of a training run
MAX_WORKERS = 512  # data-loading processes per training process
