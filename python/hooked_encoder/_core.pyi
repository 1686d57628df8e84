"""Stubs for the private extension module (see rust/hooked_encoder_py)."""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__version__: str

class HookedEncoderError(Exception): ...
class CheckpointError(HookedEncoderError): ...

def cuda_available() -> bool: ...

class Model:
    @staticmethod
    def load(config_json: str, paths: list[str], device: str) -> tuple[Model, list[str]]: ...
    @staticmethod
    def random(config_json: str, seed: int, device: str) -> Model: ...
    @staticmethod
    def from_arrays(
        config_json: str, arrays: dict[str, npt.NDArray[np.float32]], device: str
    ) -> tuple[Model, list[str]]: ...
    def hook_names(self) -> list[str]: ...
    @property
    def has_mlm_head(self) -> bool: ...
    @property
    def device(self) -> str: ...
    def forward(
        self,
        tokens: npt.NDArray[np.int64],
        token_type_ids: npt.NDArray[np.int64] | None,
        attention_mask: npt.NDArray[np.int64] | None,
        logits: bool,
        record: list[str],
        dispatch: list[str],
        dispatcher: Callable[[str, npt.NDArray[np.float32]], npt.NDArray[np.float32]] | None,
    ) -> tuple[npt.NDArray[np.float32], list[tuple[str, npt.NDArray[np.float32]]]]: ...
