"""Datasets: readers of the real on-disk formats, the demo generators that write those formats, the one
image decoder, and the views (augmentations and evaluation transforms) that pretraining and tasks share.

`catalog.py` says which folder under `--data-root` holds which dataset and reads any classification
dataset by name; one module per format (`imagenet.py`, `stl10.py`, `voc.py`, `coco.py`, `places205.py`,
`inat18.py`); `render.py` draws the demo images.
"""
