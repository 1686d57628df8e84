"""hooked_encoder: TransformerLens's ``HookedEncoder`` for BERT-style models, with the forward
pass in Rust (Candle).

    >>> from hooked_encoder import HookedEncoder
    >>> model = HookedEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    >>> _, cache = model.run_with_cache("The cat sat on the mat.", return_type=None)
    >>> cache["pattern", 0].shape  # [batch, head, query, key]
"""

import os as _os

# Candle runs elementwise ops on tensors of 64K floats and more on a thread pool of its own,
# beside ours: threads that are not pinned, spin for a while after each op (taking a core
# from ours), and do not exist in a forked child, whose first such op then waits for them
# forever. With one thread Candle starts no pool and runs those ops on the calling thread, one
# of ours. Candle reads this once, when it first needs the pool: so here, before it can.
_os.environ["CANDLE_NUM_THREADS"] = "1"

# First: refuse a CPU the compiled core cannot run on, before loading it.
from . import (
    _cpu,  # noqa: F401
    metrics,
)

try:
    from . import _core
except ImportError as _error:
    # A CUDA build whose CUDA libraries the loader cannot find: try NVIDIA's pip wheels.
    if "cannot open shared object file" not in str(_error):
        raise
    from . import _cuda_libs

    _cuda_libs.preload()
    try:
        from . import _core
    except ImportError as _still_missing:
        raise ImportError(_cuda_libs.missing_library_message(_still_missing)) from _error

# A forked child gets a new thread pool: the parent's threads do not come along.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_core.restart_after_fork)

from . import interventions
from ._core import (
    CheckpointError,
    HookedEncoderError,
    __version__,
    cpu_kernels,
    cuda_available,
    get_num_threads,
    set_num_threads,
)
from ._memory import OutOfMemoryError
from .activation_cache import ActivationCache, get_act_name
from .config import HookedEncoderConfig
from .extract import Extraction, load_extraction
from .factored_matrix import FactoredMatrix
from .hook_points import HookPoint
from .hooked_encoder import HookedEncoder
from .loading import DEFAULT_MODEL
from .next_sentence import BertNextSentencePrediction

__all__ = [
    "DEFAULT_MODEL",
    "ActivationCache",
    "BertNextSentencePrediction",
    "CheckpointError",
    "Extraction",
    "FactoredMatrix",
    "HookPoint",
    "HookedEncoder",
    "HookedEncoderConfig",
    "HookedEncoderError",
    "OutOfMemoryError",
    "__version__",
    "cpu_kernels",
    "cuda_available",
    "get_act_name",
    "get_num_threads",
    "interventions",
    "load_extraction",
    "metrics",
    "set_num_threads",
]
