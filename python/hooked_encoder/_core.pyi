"""Stubs for the private extension module (see rust/hooked_encoder_py)."""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__version__: str

class HookedEncoderError(Exception): ...
class CheckpointError(HookedEncoderError): ...

def cuda_available() -> bool: ...
def cpu_kernels() -> str: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def restart_after_fork() -> None: ...
def allocator_purge_delay_ms() -> int: ...

class TensorBuffer: ...

class DeviceTensor:
    """An activation on a GPU (CUDA builds), in the model's dtype: DLPack without a copy, or
    NumPy (float32) by copy."""

    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    def numpy(self) -> npt.NDArray[np.float32]: ...
    def __dlpack__(self, stream: int | None = None) -> object: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

class GradTape:
    """What a forward pass kept for one backward pass."""

    def __init__(self) -> None: ...

class Model:
    @staticmethod
    def load(config_json: str, paths: list[str], device: str) -> tuple[Model, list[str]]: ...
    @staticmethod
    def random(config_json: str, seed: int, device: str) -> Model: ...
    @staticmethod
    def from_arrays(
        config_json: str, arrays: dict[str, npt.NDArray[np.float32]], device: str
    ) -> tuple[Model, list[str]]: ...
    def named_weights(self) -> list[tuple[str, npt.NDArray[np.float32]]]: ...
    def hook_names(self) -> list[str]: ...
    @property
    def has_mlm_head(self) -> bool: ...
    @property
    def device(self) -> str: ...
    def forward(
        self,
        tokens: npt.NDArray[np.int64] | None,
        residual: npt.NDArray[np.float32] | None,
        token_type_ids: npt.NDArray[np.int64] | None,
        attention_mask: npt.NDArray[np.int64] | None,
        start_layer: int,
        stop_layer: int | None,
        output: str,
        record: list[str],
        dispatch: list[str],
        dispatcher: Dispatcher | None,
        tape: GradTape | None = None,
        edits: list[EditSpec] | None = None,
        position: int | None = None,
    ) -> tuple[Activation, list[tuple[str, Activation]]]: ...
    def backward(
        self,
        tape: GradTape,
        grad_output: npt.NDArray[np.float32],
        record: list[str],
        dispatch: list[str],
        dispatcher: Dispatcher | None,
        edits: list[EditSpec] | None = None,
    ) -> tuple[Activation, list[tuple[str, Activation]]]: ...
    def apply(
        self,
        part: str,
        x: npt.NDArray[np.float32],
        record: list[str],
        dispatch: list[str],
        dispatcher: Dispatcher | None,
    ) -> tuple[Activation, list[tuple[str, Activation]]]: ...
    def attention(
        self,
        layer: int,
        query: npt.NDArray[np.float32],
        key: npt.NDArray[np.float32],
        value: npt.NDArray[np.float32],
        attention_mask: npt.NDArray[np.int64] | None,
        record: list[str],
        dispatch: list[str],
        dispatcher: Dispatcher | None,
    ) -> tuple[Activation, list[tuple[str, Activation]]]: ...
    @property
    def dtype(self) -> str: ...
    def to(self, device: str, dtype: str) -> Model: ...

# NumPy on the CPU, a DeviceTensor on a GPU.
Activation = npt.NDArray[np.float32] | DeviceTensor
Dispatcher = Callable[[str, Activation], npt.NDArray[np.float32]]
# An edit applied by the pass itself: (hook name, uint8 mask, op, float32 value).
EditSpec = tuple[str, npt.NDArray[np.uint8], str, npt.NDArray[np.float32]]
