"""skl_transfer: closed-form domain adaptation of a pretrained network's last layer.

Layer variational analysis (Tseng et al., ICLR 2023) as scikit-learn estimators.
"""

from ._adapter import LayerVariationalAdapter
from ._baselines import GradientDescentAdapter, GradientDescentClassifier
from ._cache import cache_info, clear_cache, set_cache_limit
from ._classifier import LayerVariationalClassifier, LayerVariationalClassifierCV
from ._config import config_context, get_config, set_config
from ._cv import LayerVariationalAdapterCV
from ._diskcache import CacheDirectoryError, CacheLockTimeout
from ._fingerprint import CacheKeyWarning
from ._transferability import logme, transferability

__version__ = "0.1.0"

__all__ = [
    "CacheDirectoryError",
    "CacheKeyWarning",
    "CacheLockTimeout",
    "GradientDescentAdapter",
    "GradientDescentClassifier",
    "LayerVariationalAdapter",
    "LayerVariationalAdapterCV",
    "LayerVariationalClassifier",
    "LayerVariationalClassifierCV",
    "cache_info",
    "clear_cache",
    "config_context",
    "get_config",
    "logme",
    "set_cache_limit",
    "set_config",
    "transferability",
    "__version__",
]
