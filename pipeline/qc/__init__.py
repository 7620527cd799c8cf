"""Quality control: how good results are, and whether they look like what the product knows.

- :mod:`.metrics`: instance-segmentation scores (AP at IoU thresholds, mAP, matching);
- :mod:`.plausibility`: warnings for fields whose cells do not look like nuclei;
- :mod:`.evaluate`: ``pipeline evaluate``, labels against ground truth (TIFF or OME-Zarr);
- :mod:`.report`: the QC report of an output (PNG overlays, a plate heat map, an HTML index).

The package imports nothing on its own.
"""
