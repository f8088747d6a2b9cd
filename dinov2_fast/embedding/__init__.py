"""The embedding job behind ``dinov2-fast embed``: an application on the library core.

``sources`` lists the inputs (files, folders, globs, tar shards), ``preprocess`` turns an
image into the checkpoints' pixels, ``engine`` batches them through the model and pools the
output, ``sinks`` writes the rows and the output formats (``.npy``, Parquet parts),
``merge`` joins the outputs of sharded runs, ``ranks`` coordinates torchrun processes,
``lock`` keeps one run per output, ``runner`` drives a run (resume, manifest, the crash-safe
finish), ``ray_engine`` runs it on a Ray cluster (``--engine ray``; ``Embedder`` is its model
stage for Ray pipelines of one's own), and ``api`` is ``dinov2_fast.embed``, the same
pipeline for images in memory.
"""

from .api import embed
from .ray_engine import Embedder
from .runner import EmbedResult, embed_images, manifest_path
from .sources import Inputs, collect_inputs

__all__ = [
    "EmbedResult",
    "Embedder",
    "Inputs",
    "collect_inputs",
    "embed",
    "embed_images",
    "manifest_path",
]
