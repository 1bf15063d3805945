"""The divergence triangle, grown progressively.

The repository's top-level folders are this package's subpackages (see pyproject.toml):
``triangle.networks`` (networks/), ``triangle.datasets`` (datasets/),
``triangle.progressive`` (progressive/) and ``triangle.metrics`` (metrics/). This folder holds
what all of them share: ``resolutions.py`` and ``files.py``. How it fits together:
docs/design.md.
"""

__version__ = "0.1.0"
