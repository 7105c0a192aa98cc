"""Pictures of the pipeline's tables for people: boxes and masks drawn on images (:mod:`.overlay`)."""
