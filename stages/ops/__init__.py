"""Box operators on tensors and DataFrames, no I/O: IoU/IoA, (soft/adj-)NMS, hierarchy expansion, relationship
rescoring and the naive ensemble (PFDet re-weighting + top-k voting); masks: paste, vote, COCO RLE (``masks``)."""
