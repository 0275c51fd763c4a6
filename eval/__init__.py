"""Evaluation of pretrained backbones; uses the library (``ssl_container``), never the other way round.

* ``eval.features``  backbone features over a split: exactly once across ranks, cached on disk
* ``eval.knn``       DINO's weighted k-NN on faiss (``python -m eval.knn``), sharded on-disk train features
* ``eval.linear``    linear probes: DINO's protocol or a DINOv2-style head grid on cached features
  (``python -m eval.linear``)
* ``eval.plots``     the PNG figures of the results
* ``eval.detection`` detection transfer (``python -m eval.detection``)
"""
import logging as _logging

# faiss logs "Could not load library with AVX512 support ... ModuleNotFoundError" at INFO while it picks
# its best build: routine, but it reads like an error under an INFO log level. Its loader speaks at WARNING.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
