"""The files of a run directory, named once for everything that writes or reads them."""

CONFIG = "config.yaml"  # the resolved run configuration
MODEL = "model.pt"  # the quantized model, self-describing (dfq.checkpoint)
SUMMARY = "summary.json"  # what `dfq quantize --json` printed
METRICS = "metrics.jsonl"  # one record per epoch of a generator-based method
TRAIN_CHECKPOINT = "checkpoint.pt"  # the resumable state of a generator-based method
SENSITIVITY = "sensitivity.json"  # mixed precision: measured losses per tensor and bit-width (a cache)
ALLOCATION = "allocation.json"  # mixed precision: the chosen bits, their predicted loss and costs

__all__ = ["ALLOCATION", "CONFIG", "METRICS", "MODEL", "SENSITIVITY", "SUMMARY", "TRAIN_CHECKPOINT"]
