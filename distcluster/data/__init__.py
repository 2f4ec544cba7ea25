"""Images in: decoding files and archives, in-memory and FFCV sources, sharding per rank, the
prepare cache, and multi-crop augmentation on the training device.
"""
