"""cpmkit: convert, quantize and verify OpenBMB MiniCPM checkpoints."""

from cpmkit.errors import CpmkitError

__version__ = "0.1.0"
__all__ = ["CpmkitError", "__version__"]
