"""Orchestration: runs of whole plates on a Dask cluster, resumable, one field at a time.

From the bottom up:

- :mod:`.outcomes`: what happened to each field, and the run's summary;
- :mod:`.cluster`: the cluster a run computes on (local, SLURM, an existing scheduler);
- :mod:`.records`: what an output records (each field's completion record, the run's ledger);
- :mod:`.plan`: which fields a run computes and which are done;
- :mod:`.layout`: where results go in the output;
- :mod:`.field`: one field's stages, from image to labels, tables and record;
- :mod:`.plate`: a plate's fields in flight on the cluster, then the plate metadata;
- :mod:`.runner`: ``pipeline run`` and ``pipeline reprocess``: plan, cluster, progress, reports.

The package imports nothing on its own; :func:`pipeline.run` is the public face.
"""
