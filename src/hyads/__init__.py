"""hyads: hybrid anomaly detection for industrial visual inspection.

Learns "normal" from defect-free images only; for each new image gives an anomaly score, a per-pixel heat
map and a binary defect mask.
"""

__version__ = "0.1.0"

from .config import HyADSConfig  # noqa: E402
from .errors import HyADSError  # noqa: E402
from .pipeline import HyADS  # noqa: E402
from .persist import load_model  # noqa: E402

__all__ = ["HyADS", "HyADSConfig", "HyADSError", "load_model", "__version__"]
