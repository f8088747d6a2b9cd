"""The embedding job behind ``dinov2-fast embed``: an application on the library core.

``sources`` lists the inputs, ``preprocess`` turns an image into the checkpoints' pixels,
``engine`` batches them through the model and pools the output, ``sinks`` writes the rows,
``ranks`` coordinates torchrun processes, and ``runner`` drives a run: resume, manifest,
the crash-safe finish.
"""

from .runner import EmbedResult, embed_images, manifest_path
from .sources import collect_inputs

__all__ = ["EmbedResult", "collect_inputs", "embed_images", "manifest_path"]
