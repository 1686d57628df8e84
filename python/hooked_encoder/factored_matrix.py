"""``FactoredMatrix``: a matrix kept as the product of two factors, ``A @ B``.

An attention head's circuits are low-rank products of its weights: the QK circuit is
``W_Q @ W_K.T`` (``[d_model, d_model]``, rank at most ``d_head``) and the OV circuit is
``W_V @ W_O`` (the same shapes). ``HookedEncoder.QK`` and ``HookedEncoder.OV`` return them as
``FactoredMatrix`` objects with leading dims ``[n_layers, n_heads]``. The full product is never
materialised unless asked for (``.AB``); the SVD, norm and eigenvalues are computed from the
small ``d_head``-sized factors instead.

This follows TransformerLens's ``FactoredMatrix`` (``transformer_lens/FactoredMatrix.py``), on
NumPy arrays instead of torch tensors. The differences are listed on the class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FactoredMatrix"]


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _linalg_ready(x: np.ndarray) -> np.ndarray:
    """``np.linalg`` has no float16 kernels; TransformerLens casts 16-bit inputs to float32."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


class FactoredMatrix:
    """The matrix ``A @ B``, stored as its factors, with optional leading (batch) dims.

    ``A`` is ``[..., ldim, mdim]`` and ``B`` is ``[..., mdim, rdim]``; their leading dims are
    broadcast to a common shape (and ``A``/``B`` stored broadcast, as TransformerLens does).
    The factors are treated as immutable: the SVD is computed once and cached.

    Differences from TransformerLens:

    * errors are ``ValueError`` (shape mismatches) and ``IndexError`` (indexing) rather than
      ``AssertionError``/``RuntimeError``;
    * ``Vh`` is ``[..., mdim, rdim]`` so that ``U @ diag(S) @ Vh == AB`` (TransformerLens's
      ``Vh`` is torch.svd's ``V``, ``[..., rdim, mdim]``);
    * indexing reaches only the leading dims (TransformerLens also lets the last one or two
      indices slice rows of ``A`` / columns of ``B``).
    """

    # Make NumPy defer to our __rmatmul__ / __rmul__ (``array @ fm``, ``np.float32(2) * fm``)
    # instead of treating a FactoredMatrix as an object array.
    __array_ufunc__ = None

    def __init__(self, A: Any, B: Any) -> None:
        """Builds ``A @ B`` from its factors.

        Args:
            A: ``[..., ldim, mdim]``, anything ``np.asarray`` accepts.
            B: ``[..., mdim, rdim]``; leading dims must broadcast against ``A``'s.

        Raises:
            ValueError: if a factor has fewer than 2 dims, the inner dims differ or the leading
                dims do not broadcast.
        """
        A = np.asarray(A)
        B = np.asarray(B)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"FactoredMatrix factors must have at least 2 dims, shapes were A: {A.shape}, "
                f"B: {B.shape}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"FactoredMatrix factors must match on the inner dimension, shapes were "
                f"A: {A.shape}, B: {B.shape}"
            )
        try:
            leading = np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError as e:
            raise ValueError(
                f"FactoredMatrix factors' leading dims do not broadcast, shapes were "
                f"A: {A.shape}, B: {B.shape}"
            ) from e
        self.ldim: int = A.shape[-2]
        self.mdim: int = A.shape[-1]
        self.rdim: int = B.shape[-1]
        self.has_leading_dims: bool = A.ndim > 2 or B.ndim > 2
        self.shape: tuple[int, ...] = (*leading, self.ldim, self.rdim)
        self.A: np.ndarray = np.broadcast_to(A, (*leading, self.ldim, self.mdim))
        self.B: np.ndarray = np.broadcast_to(B, (*leading, self.mdim, self.rdim))
        self._svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ---------------------------------------------------------------- products

    def __matmul__(self, other: Any) -> FactoredMatrix | np.ndarray:
        """``self @ other``.

        Args:
            other: a FactoredMatrix, a matrix ``[..., rdim, n]`` or a vector ``[rdim]``.

        Returns:
            A FactoredMatrix, or for a vector the array ``[..., ldim]`` (computed as
            ``A @ (B @ v)``). The hidden dim is kept small: a matrix is multiplied into ``B``
            when ``rdim > mdim``, else the product becomes ``FactoredMatrix(AB, other)``.

        Raises:
            ValueError: if ``other``'s rows do not match ``rdim``.
        """
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        other = np.asarray(other)
        if other.ndim == 0:
            raise ValueError("Cannot matmul a FactoredMatrix by a scalar; use * instead")
        if other.shape[-2 if other.ndim >= 2 else 0] != self.rdim:
            raise ValueError(
                f"Right operand must match on the inner dimension, shapes were self: "
                f"{self.shape}, other: {other.shape}"
            )
        if other.ndim == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> FactoredMatrix | np.ndarray:
        """``other @ self``.

        Args:
            other: a FactoredMatrix, a matrix ``[..., n, ldim]`` or a vector ``[ldim]``.

        Returns:
            A FactoredMatrix, or for a vector the array ``[..., rdim]`` (computed as
            ``(v @ A) @ B``). A matrix is multiplied into ``A`` when ``ldim > mdim``, else the
            product becomes ``FactoredMatrix(other, AB)``.

        Raises:
            ValueError: if ``other``'s columns do not match ``ldim``.
        """
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        other = np.asarray(other)
        if other.ndim == 0:
            raise ValueError("Cannot matmul a FactoredMatrix by a scalar; use * instead")
        if other.shape[-1] != self.ldim:
            raise ValueError(
                f"Left operand must match on the inner dimension, shapes were self: "
                f"{self.shape}, other: {other.shape}"
            )
        if other.ndim == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Any) -> FactoredMatrix:
        """Scalar multiplication, applied to ``A``.

        Args:
            scalar: a number, or an array with one element.

        Raises:
            ValueError: if ``scalar`` has more than one element (use ``@`` for products).
        """
        value = np.asarray(scalar)
        if value.dtype.kind not in "biufc":
            return NotImplemented
        if value.size != 1:
            raise ValueError(
                f"FactoredMatrix can only be multiplied by a scalar with *, got shape "
                f"{value.shape}; use @ for matrix products"
            )
        # A Python scalar, so that NumPy keeps A's dtype (float32 stays float32).
        return FactoredMatrix(self.A * value.item(), self.B)

    def __rmul__(self, scalar: Any) -> FactoredMatrix:
        """``scalar * self``; the same as ``self * scalar``."""
        return self.__mul__(scalar)

    @property
    def AB(self) -> np.ndarray:
        """The full product ``A @ B``, ``[..., ldim, rdim]``: can be large."""
        return self.A @ self.B

    @property
    def BA(self) -> np.ndarray:
        """The reverse product ``B @ A``, ``[..., mdim, mdim]``.

        Raises:
            ValueError: unless ``ldim == rdim``.
        """
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim, shape was {self.shape}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, ``FactoredMatrix(B.T, A.T)``."""
        return FactoredMatrix(_swap(self.B), _swap(self.A))

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """The factors ``(A, B)``."""
        return (self.A, self.B)

    # ------------------------------------------------------- decompositions

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The thin SVD of ``AB``, without forming ``AB``.

        Takes the SVDs of ``A`` and ``B``, then of the small middle matrix
        ``diag(S_A) Vh_A U_B diag(S_B)``. Cached.

        Returns:
            ``(U, S, Vh)`` with ``U`` ``[..., ldim, k]``, ``S`` ``[..., k]`` (descending) and
            ``Vh`` ``[..., k, rdim]``, ``k = min(ldim, mdim, rdim)`` (``mdim`` for QK/OV), such
            that ``U @ (S[..., None] * Vh) == AB``.
        """
        if self._svd is None:
            Ua, Sa, Vha = np.linalg.svd(_linalg_ready(self.A), full_matrices=False)
            Ub, Sb, Vhb = np.linalg.svd(_linalg_ready(self.B), full_matrices=False)
            middle = (Sa[..., :, None] * Vha) @ (Ub * Sb[..., None, :])
            Um, Sm, Vhm = np.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, Sm, Vhm @ Vhb)
        return self._svd

    @property
    def U(self) -> np.ndarray:
        """Left singular vectors, ``[..., ldim, k]``; see ``svd``."""
        return self.svd()[0]

    @property
    def S(self) -> np.ndarray:
        """Singular values, descending, ``[..., k]``; see ``svd``."""
        return self.svd()[1]

    @property
    def Vh(self) -> np.ndarray:
        """Right singular vectors as rows, ``[..., k, rdim]``; see ``svd``."""
        return self.svd()[2]

    @property
    def eigenvalues(self) -> np.ndarray:
        """The eigenvalues of ``AB`` (complex, ``[..., mdim]``), from the small ``BA``.

        ``AB``'s other ``ldim - mdim`` eigenvalues are zero: if ``BAv = kv`` then
        ``AB(Av) = k(Av)``.

        Raises:
            ValueError: unless ``ldim == rdim``.
        """
        values = np.linalg.eigvals(_linalg_ready(self.BA))
        # np.linalg.eigvals drops to a real dtype when every eigenvalue is real; TL's
        # torch.linalg.eig always returns complex.
        return values.astype(np.result_type(values.dtype, np.complex64), copy=False)

    def norm(self) -> np.ndarray:
        """The Frobenius norm of ``AB``, ``[...]``, as ``sqrt(sum(S**2))``."""
        return np.sqrt(np.sum(self.S**2, axis=-1))

    def make_even(self) -> FactoredMatrix:
        """An equivalent, balanced factorisation: ``(U sqrt(S), sqrt(S) Vh)``.

        Each factor carries half of each singular value and has orthogonal columns / rows.
        """
        root = np.sqrt(self.S)
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.Vh)

    def collapse_l(self) -> np.ndarray:
        """``AB`` without its left orthogonal factor ``U``: ``diag(S) Vh``, ``[..., k, rdim]``."""
        return self.S[..., :, None] * self.Vh

    def collapse_r(self) -> np.ndarray:
        """``AB`` without its right orthogonal factor ``Vh``: ``U diag(S)``, ``[..., ldim, k]``."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------- shape

    @property
    def ndim(self) -> int:
        """The number of dims of ``AB`` (leading dims + 2)."""
        return len(self.shape)

    def get_corner(self, k: int = 3) -> np.ndarray:
        """The first ``k`` entries of ``AB`` along every dim, leading dims included.

        As TransformerLens (``utils.get_corner``): for ``[n_layers, n_heads, d, d]`` this is
        ``AB[:k, :k, :k, :k]``. Only ``A``'s first ``k`` rows and ``B``'s first ``k`` columns
        are multiplied.
        """
        lead = (slice(k),) * (self.ndim - 2)
        return self.A[(*lead, slice(k), slice(None))] @ self.B[(*lead, slice(None), slice(k))]

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Indexes the leading dims: ``OV[layer]``, ``OV[layer, head]``, ``OV[:, head]``.

        Raises:
            IndexError: for an index out of range, or one that reaches past the leading dims.
        """
        if not isinstance(idx, tuple):
            idx = (idx,)
        # Validate against the leading dims alone, so that nothing reaches into the matrix.
        try:
            np.broadcast_to(np.empty((), dtype=np.int8), self.shape[:-2])[idx]
        except IndexError as e:
            raise IndexError(
                f"FactoredMatrix indexing applies to the leading dims {self.shape[:-2]} of "
                f"shape {self.shape}: {e}"
            ) from None
        rest = (slice(None), slice(None))
        return FactoredMatrix(self.A[(*idx, *rest)], self.B[(*idx, *rest)])

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """Adds a leading dim of size 1 at position ``k`` (as ``torch.unsqueeze`` on ``AB``).

        Raises:
            IndexError: if the new dim would not be a leading dim.
        """
        pos = k + self.ndim + 1 if k < 0 else k
        if not 0 <= pos <= self.ndim - 2:
            raise IndexError(
                f"unsqueeze({k}) must add a leading dim of a FactoredMatrix of shape {self.shape}"
            )
        return FactoredMatrix(np.expand_dims(self.A, pos), np.expand_dims(self.B, pos))

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"
