"""skutag: tag e-commerce catalog images with a vision-language model.

The flow, one module per stage: intake (images.py) -> engine (inference.py) -> writer (writer.py).
The job ledger (pipeline/ledger/) in the database is the source of truth; Celery (workers/) only delivers.
"""

__version__ = "0.1.0"
