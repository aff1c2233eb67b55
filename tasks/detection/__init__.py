"""Detection transfer (paper §8.4, Tables 5 and 10): a detector finetuned from the checkpoint.

`protocol.py` declares the two protocols, `recipes.py` what each task builds and scores (read by the task and
both engines), `data.py` turns VOC / COCO into one list of image records,
`metrics.py` scores predictions, and the engines (`tv_engine.py`: torchvision, always available;
`d2_engine.py`: Detectron2, when it imports) build, train and run the detectors. `run.py` ties them.
"""
