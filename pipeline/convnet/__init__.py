"""The nuclear conv-net: architecture (:mod:`.unet`), model files (:mod:`.weights`), tiled
inference (:mod:`.inference`), receptive field and stride measurement
(:mod:`.receptive_field`) and training (:mod:`.training`).

Nothing is imported here, so that ``import pipeline.convnet.weights`` stays free of torch.
"""
