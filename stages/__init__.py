"""Orchard: the detection track of the OpenImages Challenge 2019 winning solution (MMfruit) as a reproducible DAG.

Every DAG step is a module ``stages.<step>`` holding a pure core function and a thin ``main(argv)``.
Shared code lives in subpackages that are not steps: ``core`` (config, CLI and error plumbing, provenance),
``formats`` (tables, OpenImages files, I/O), ``ops`` (box ops), ``models`` (detectors), ``metrics`` (the
OpenImages Challenge metric, for boxes and for instance masks), ``viz`` (boxes and masks drawn on images) and
``data`` (the built-in dataset's classes and drawing). Instance segmentation (MMfruitSeg) is scored and its
submission format read, but no stage produces masks yet.
"""

__version__ = "0.1.0"
