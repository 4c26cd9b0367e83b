r"""Image folders at any resolution (medical images, ImageNet-style sets): folder:PATH at 224 px, ResNet-50.

  python -m contrastood.main --config=configs/folder.py:path=/data/xray --workdir=DIR \
      --config.data.num_classes=3 --config.ood.sets.other=folder:/data/other_scans
  python -m contrastood.data.synthetic /tmp/contrastood_synthetic --train=2000 --size=128   # then:
  python -m contrastood.main --config=configs/folder.py:cpu --workdir=/tmp/folder_cpu      # minutes on a CPU

PATH holds train/<class>/<image> and test/<class>/<image> (any of png, jpg, bmp, webp, gif, tif); the
images are read from disk as batches need them, SimCLR's crops are cut from the originals, and the
ImageNet stem (7x7 stride 2 + max-pool) is chosen for images of 64 px and more. Input statistics are
ImageNet's; set data.mean=() and data.std=() to measure them on the training images.

Arguments: `path=DIR` (default /tmp/contrastood_synthetic, the synthetic set above, whose ood/ split
holds two shapes the model never sees), `size=S` (default 224, :cpu 64), `cpu` (tiny ResNet, 64 px,
80 steps).
"""
from contrastood import config_lib

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, cpu=False, path="/tmp/contrastood_synthetic", size=0)
    config = config_lib.base_config()
    config.data.train = f"folder:{args.path}:train"
    config.data.test = f"folder:{args.path}:test"
    config.data.num_classes = 4  # the synthetic set's; set --config.data.num_classes for your folders
    config.data.image_size = args.size or (64 if args.cpu else 224)
    config.data.mean, config.data.std = IMAGENET_MEAN, IMAGENET_STD
    config.model.name = "resnet50"
    config.model.width = 1
    config.train.batch_size = 256
    config.train.stage1_epochs = 200
    config.train.stage2_epochs = 50
    config.train.warmup_epochs = 10
    config.train.label_smoothing = 0.1
    config.train.class_weight = 10.0
    config.ood.sets = config_lib.ood_sets(unseen_shapes=f"folder:{args.path}:ood", noise="noise:gaussian:400")
    if args.cpu:
        config_lib.apply_cpu_variant(config)
        config.train.temperature = 0.5
        config.ood.knn_k = 10
    return config
