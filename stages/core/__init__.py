"""Plumbing shared by every stage, not a step itself: config validation (``config``), the CLI wrapper that turns
:class:`~stages.core.errors.InputError` into one clear line and exit code 2 (``cli``), the error types
(``errors``) and the launcher of training jobs (``launch``: python, torchrun or srun + torchrun)."""
