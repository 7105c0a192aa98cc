"""The built-in dataset ``orchard-mini``: its class taxonomy (:mod:`.taxonomy`) and drawing primitives
(:mod:`.draw`). The stage that writes it is :mod:`stages.generate`."""
