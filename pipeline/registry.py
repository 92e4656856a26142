"""The import name that models registered before the ``pipeline/`` folders existed load through.

Each such version's models-from-code file says ``from pipeline.registry import MetaLSTMPyfunc``; MLflow runs
that line whenever the version is loaded with ``mlflow.pyfunc.load_model``, so the name stays. New versions
name :mod:`pipeline.tracking.pyfunc` instead.
"""

from pipeline.tracking.pyfunc import MetaLSTMPyfunc

__all__ = ["MetaLSTMPyfunc"]
