"""``dalbt embed``: a frozen encoder's embeddings of a dataset or an image folder, cached.

It writes what ``--finetune head`` runs and labelling projects read (:mod:`dalbt.embeddings`):
with the same images, encoder and ``--out`` as a run's cache directory (its ``--pretrain-cache``
or ``--out``; a project's directory), the run finds the file and does not embed again.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dalbt.cli.types import add_backbone_options, image_size, positive_int, threads


def add_embed_parser(sub: Any) -> None:
    """``dalbt embed``."""
    e = sub.add_parser("embed", help="embed a dataset or image folder once (embedding cache)",
                       description="Write a frozen encoder's embeddings of a dataset or image "
                                   "folder to DIR/embeddings/, where --finetune head runs and "
                                   "labelling projects with that cache directory read them.")
    source = e.add_mutually_exclusive_group()
    source.add_argument("--dataset", default="digits",
                        help="dataset name (see 'dalbt datasets'; default digits)")
    source.add_argument("--images", default=None, metavar="DIR",
                        help="an ImageFolder tree (one sub-folder per class) instead")
    e.add_argument("--data-root", default=None, help="directory with the dataset files")
    e.add_argument("--image-size", type=image_size, default=None,
                   help="--images: side the images are resized to (default: their own size)")
    e.add_argument("--model", required=True,
                   help="timm:NAME, torchvision:NAME or a registered model (see 'dalbt models')")
    add_backbone_options(e)
    e.add_argument("--split", choices=("train", "test", "both"), default="both",
                   help="which images to embed (default both)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype (runs read float32; float16 halves the file)")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="cache directory: the files go to DIR/embeddings/")
    e.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
    e.add_argument("--batch", type=positive_int, default=None,
                   help="images per pass (default: the model's)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed the chosen split(s) and print where each file is."""
    from dalbt import catalogue

    catalogue.check_model(args.model, args.weights, args.input_size)
    if args.images is None:
        catalogue.check_dataset(args.dataset)
    import torch
    from tqdm import tqdm

    from dalbt.embeddings import EmbeddingCache
    from dalbt.models import build_model
    from dalbt.probe import cached_latents

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.images is not None:
        from dalbt.data import from_image_folder

        data = from_image_folder(args.images, args.image_size)
    else:
        from dalbt.data import load_dataset

        data = load_dataset(args.dataset, args.data_root)
    model = build_model(args.model, data.channels, data.image_size, max(data.num_classes, 1),
                        weights=args.weights, input_size=args.input_size, seed=0)
    if args.batch is not None:
        model.inference_batch = args.batch
    cache = EmbeddingCache(args.out, args.dtype)
    splits = {"train": data.x_train, "test": data.x_test}
    for split in ("train", "test") if args.split == "both" else (args.split,):
        images = splits[split]
        if len(images) == 0:
            print(f"{split}: no image")
            continue
        bar = tqdm(total=len(images), desc=f"embed {split}", unit="img",
                   disable=args.no_progress or not sys.stderr.isatty())
        with bar:
            arr, made = cached_latents(model, images, cache, bar.update)
        print(f"{split}: {len(arr)} x {arr.shape[1]} {args.dtype} "
              f"{'written to' if made else 'already in'} {arr.filename}")
    return 0


__all__ = ["add_embed_parser", "cmd_embed"]
