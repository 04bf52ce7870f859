"""Data sets, recipes and loaders: the API train.py and eval.py use.

    train_set, val_set, info = build_datasets(cfg.data, cfg.aug)
    train_transform, _ = batch_transforms(cfg.data, cfg.aug, info.mean, info.std)
    loader = build_train_loader(train_set, cfg.data, rank, world_size, cfg.seed)
    for epoch in ...:
        start_epoch(loader, epoch)
        for images, labels in loader:  # uint8 NCHW at img_size, int64
            images = train_transform(images.to(device))  # float32 NCHW, augmented and normalised
"""
from data.loaders.build import (DatasetInfo, build_datasets, build_eval_loader, build_train_loader, loader_workers,
                               sample_images, skipped_images, start_epoch)
from data.loaders.predict import Predicting, collate_predicting, predict_inputs
from data.loaders.recipes import batch_transforms, data_mean_std
from data.loaders.samplers import ExactShardSampler
from data.sources import DataError

__all__ = ["DataError", "DatasetInfo", "ExactShardSampler", "Predicting", "batch_transforms", "build_datasets",
           "build_train_loader", "build_eval_loader", "collate_predicting", "data_mean_std", "loader_workers",
           "predict_inputs", "sample_images", "skipped_images", "start_epoch"]
