"""The images pretraining reads (labels unused), decoded once per step into a uint8 batch by
`datasets.decode.SquareImages`; the K views are cut from that batch by `datasets.views.make_views`."""
from datasets.catalog import read_classification_splits, resolve_data_root


def pretrain_images(cfg):
    """The ClassificationSplit(s) to pretrain on (STL-10's train+unlabeled is two)."""
    return read_classification_splits(resolve_data_root(cfg.data_root), cfg.dataset, cfg.split,
                                      class_list=cfg.class_list)
