"""Cell classification from single-cell crops: the classifier (:mod:`.classifier`) and labels
for training from a marker channel (:mod:`.marker`)."""
