"""Pictures for people: boxes and masks drawn on images (:mod:`.overlay`), auto-ensemble trees (:mod:`.tree`)."""
