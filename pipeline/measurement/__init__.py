"""Per-cell measurements: of every cell in every frame (:mod:`.cells`) and along tracks
(:mod:`.tracks`)."""
