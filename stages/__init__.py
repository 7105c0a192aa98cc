"""Orchard: the OpenImages Challenge 2019 winning pipeline (MMfruit / MMfruitSeg) as a reproducible DAG.

Every DAG step is a module ``stages.<step>`` holding a pure core function and a thin ``main(argv)``.
Shared code lives in small subpackages: ``formats`` (tables, OpenImages files, I/O), ``ops`` (box ops),
``models`` (detectors), ``metrics`` (the OpenImages Challenge metric).
"""

__version__ = "0.1.0"
