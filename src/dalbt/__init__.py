"""dalbt: deep active learning with Barlow Twins."""

from dalbt.errors import DalbtError

__version__ = "0.1.0"
__all__ = ["DalbtError", "__version__"]
