"""``FactoredMatrix`` against NumPy's dense equivalents."""

from __future__ import annotations

import numpy as np
import pytest

from hooked_encoder.factored_matrix import FactoredMatrix

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _rand(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def rect(rng):
    """A non-square product: [2, 3, 8, 4] @ [2, 3, 4, 6], float32, with its float64 product."""
    A, B = _rand(rng, 2, 3, 8, 4), _rand(rng, 2, 3, 4, 6)
    return FactoredMatrix(A, B), A, B, A.astype(np.float64) @ B.astype(np.float64)


@pytest.fixture(params=[np.float32, np.float64])
def square(rng, request):
    """A square product, [2, 3, 8, 4] @ [2, 3, 4, 8], in both float widths."""
    A, B = _rand(rng, 2, 3, 8, 4, dtype=request.param), _rand(rng, 2, 3, 4, 8, dtype=request.param)
    return FactoredMatrix(A, B), A, B, A.astype(np.float64) @ B.astype(np.float64)


@pytest.fixture
def square64(rng):
    """The square case in float64, for the SVD and eigenvalue numerics."""
    A, B = _rand(rng, 2, 3, 8, 4, dtype=np.float64), _rand(rng, 2, 3, 4, 8, dtype=np.float64)
    return FactoredMatrix(A, B), A, B, A @ B


def test_ab_shape_ndim(rect):
    fm, A, _, AB = rect
    assert fm.shape == (2, 3, 8, 6)
    assert fm.ndim == 4
    assert (fm.ldim, fm.mdim, fm.rdim) == (8, 4, 6)
    assert fm.has_leading_dims
    assert fm.AB.dtype == np.float32
    np.testing.assert_allclose(fm.AB, AB, **TOL)
    assert fm.pair[0] is fm.A and fm.pair[1] is fm.B
    np.testing.assert_array_equal(fm.A, A)
    assert repr(fm) == "FactoredMatrix: Shape((2, 3, 8, 6)), Hidden Dim(4)"


def test_accepts_lists():
    fm = FactoredMatrix([[1.0, 2.0], [3.0, 4.0]], [[1.0], [1.0]])
    assert fm.shape == (2, 1)
    assert not fm.has_leading_dims
    np.testing.assert_array_equal(fm.AB, [[3.0], [7.0]])


def test_transpose(rect):
    fm, _, _, AB = rect
    assert fm.T.shape == (2, 3, 6, 8)
    np.testing.assert_allclose(fm.T.AB, AB.swapaxes(-1, -2), **TOL)
    np.testing.assert_allclose(fm.T.T.AB, AB, **TOL)


def test_ba(square):
    fm, A, B, _ = square
    assert fm.BA.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(fm.BA, B.astype(np.float64) @ A.astype(np.float64), **TOL)


@pytest.mark.parametrize("factors", ["rect", "square64"])
def test_svd(factors, request):
    fm, A, B, _ = request.getfixturevalue(factors)
    A, B = A.astype(np.float64), B.astype(np.float64)
    fm = FactoredMatrix(A, B)
    AB = A @ B
    U, S, Vh = fm.svd()
    assert U.shape == (2, 3, fm.ldim, 4)
    assert S.shape == (2, 3, 4)
    assert Vh.shape == (2, 3, 4, fm.rdim)
    assert fm.U is U and fm.S is S and fm.Vh is Vh  # cached
    np.testing.assert_allclose(U @ (S[..., None] * Vh), AB, **TOL)
    np.testing.assert_allclose(S, np.linalg.svd(AB, compute_uv=False)[..., :4], **TOL)
    assert np.all(np.diff(S, axis=-1) <= 0)
    eye = np.broadcast_to(np.eye(4), (2, 3, 4, 4))
    np.testing.assert_allclose(U.swapaxes(-1, -2) @ U, eye, atol=1e-10)
    np.testing.assert_allclose(Vh @ Vh.swapaxes(-1, -2), eye, atol=1e-10)


def test_svd_float32(rect):
    fm, _, _, AB = rect
    U, S, Vh = fm.svd()
    assert U.dtype == S.dtype == Vh.dtype == np.float32
    np.testing.assert_allclose(U @ (S[..., None] * Vh), AB, rtol=1e-4, atol=1e-4)


def test_norm(rect):
    fm, _, _, AB = rect
    assert fm.norm().shape == (2, 3)
    np.testing.assert_allclose(fm.norm(), np.linalg.norm(AB, axis=(-2, -1)), **TOL)


def test_collapse(rect):
    fm, _, _, AB = rect
    assert fm.collapse_l().shape == (2, 3, 4, 6)
    assert fm.collapse_r().shape == (2, 3, 8, 4)
    np.testing.assert_allclose(fm.collapse_r() @ fm.Vh, AB, **TOL)
    np.testing.assert_allclose(fm.U @ fm.collapse_l(), AB, **TOL)


def test_make_even(square64):
    fm, _, _, AB = square64
    even = fm.make_even()
    assert even.mdim == 4
    np.testing.assert_allclose(even.AB, AB, **TOL)
    gram = even.A.swapaxes(-1, -2) @ even.A  # orthogonal columns, norms sqrt(S)
    np.testing.assert_allclose(gram, fm.S[..., None] * np.eye(4), **TOL)
    np.testing.assert_allclose(even.B @ even.B.swapaxes(-1, -2), gram, **TOL)


def test_eigenvalues(square64):
    fm, _, _, AB = square64
    ev = fm.eigenvalues
    assert ev.shape == (2, 3, 4)
    assert np.iscomplexobj(ev)
    dense = np.linalg.eigvals(AB)
    for i in np.ndindex(2, 3):
        top = dense[i][np.argsort(-np.abs(dense[i]))[:4]]
        assert np.abs(top).min() > 1e-3  # the non-zero eigenvalues are well separated from 0
        np.testing.assert_allclose(np.sort_complex(ev[i]), np.sort_complex(top), **TOL)


def test_eigenvalues_dtype(rng):
    fm = FactoredMatrix(_rand(rng, 5, 2), _rand(rng, 2, 5))
    assert fm.eigenvalues.dtype == np.complex64
    fm16 = FactoredMatrix(fm.A.astype(np.float16), fm.B.astype(np.float16))
    assert fm16.eigenvalues.dtype == np.complex64
    assert fm16.S.dtype == np.float32


def test_get_corner(rect):
    fm, _, _, AB = rect
    corner = fm.get_corner(3)
    assert corner.shape == (2, 3, 3, 3)  # every dim cut to 3, as TransformerLens
    np.testing.assert_allclose(corner, AB[:3, :3, :3, :3], **TOL)
    np.testing.assert_allclose(fm[1, 2].get_corner(2), AB[1, 2, :2, :2], **TOL)
    np.testing.assert_allclose(fm[0, 0].get_corner(), AB[0, 0, :3, :3], **TOL)


def test_matmul_dense(rng, rect):
    fm, _, _, AB = rect
    M = _rand(rng, 6, 5)
    out = fm @ M
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 3, 8, 5)
    assert out.mdim == 4  # rdim > mdim: multiplied into B
    np.testing.assert_allclose(out.AB, AB @ M, **TOL)
    batched = _rand(rng, 2, 3, 6, 5)
    np.testing.assert_allclose((fm @ batched).AB, AB @ batched, **TOL)

    L = _rand(rng, 5, 8)
    out = L @ fm
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 3, 5, 6)
    assert out.mdim == 4  # ldim > mdim: multiplied into A
    np.testing.assert_allclose(out.AB, L @ AB, **TOL)
    np.testing.assert_allclose(fm.__rmatmul__(L.tolist()).AB, L @ AB, **TOL)


def test_matmul_dense_wide_hidden(rng):
    """When the hidden dim is not the smallest, TransformerLens collapses to (AB, other)."""
    A, B = _rand(rng, 3, 5, 4), _rand(rng, 3, 4, 2)
    fm, AB = FactoredMatrix(A, B), A.astype(np.float64) @ B
    M = _rand(rng, 2, 7)
    out = fm @ M
    assert out.mdim == 2
    np.testing.assert_allclose(out.AB, AB @ M, **TOL)
    fmT = fm.T  # ldim 2 < mdim 4
    L = _rand(rng, 7, 2)
    out = L @ fmT
    assert out.mdim == 2
    np.testing.assert_allclose(out.AB, L @ AB.swapaxes(-1, -2), **TOL)


def test_matmul_vector(rng, rect):
    fm, _, _, AB = rect
    v = _rand(rng, 6)
    out = fm @ v
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 8)
    np.testing.assert_allclose(out, AB @ v, **TOL)
    w = _rand(rng, 8)
    out = w @ fm
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 6)
    np.testing.assert_allclose(out, w @ AB, **TOL)


def test_matmul_factored(rng, rect):
    fm, _, _, AB = rect
    A2, B2 = _rand(rng, 2, 3, 6, 5), _rand(rng, 2, 3, 5, 7)
    right = FactoredMatrix(A2, B2)
    out = fm @ right
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 3, 8, 7)
    np.testing.assert_allclose(out.AB, AB @ (A2.astype(np.float64) @ B2), **TOL)

    A3, B3 = _rand(rng, 2, 3, 7, 3), _rand(rng, 2, 3, 3, 8)
    left = FactoredMatrix(A3, B3)
    dense_left = A3.astype(np.float64) @ B3
    out = left @ fm
    assert isinstance(out, FactoredMatrix) and out.shape == (2, 3, 7, 6)
    np.testing.assert_allclose(out.AB, dense_left @ AB, **TOL)
    np.testing.assert_allclose(fm.__rmatmul__(left).AB, dense_left @ AB, **TOL)


def test_matmul_mismatch(rect):
    fm = rect[0]
    with pytest.raises(ValueError, match="inner dimension"):
        fm @ np.ones((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="inner dimension"):
        fm @ np.ones(5, dtype=np.float32)
    with pytest.raises(ValueError, match="inner dimension"):
        np.ones((2, 6), dtype=np.float32) @ fm
    with pytest.raises(ValueError, match="inner dimension"):
        np.ones(6, dtype=np.float32) @ fm
    with pytest.raises(ValueError, match="scalar"):
        fm @ 2.0


def test_indexing(rect):
    fm, _, _, AB = rect
    assert fm[1].shape == (3, 8, 6)
    np.testing.assert_allclose(fm[1].AB, AB[1], **TOL)
    assert fm[1, 2].shape == (8, 6)
    np.testing.assert_allclose(fm[1, 2].AB, AB[1, 2], **TOL)
    np.testing.assert_allclose(fm[:, 0].AB, AB[:, 0], **TOL)
    np.testing.assert_allclose(fm[-1, 1:].AB, AB[-1, 1:], **TOL)
    np.testing.assert_allclose(fm[..., 1].AB, AB[:, 1], **TOL)
    np.testing.assert_allclose(fm[[0, 1], [2, 0]].AB, AB[[0, 1], [2, 0]], **TOL)
    assert fm[None].shape == (1, 2, 3, 8, 6)
    with pytest.raises(IndexError, match="leading dims"):
        fm[1, 2, 0]
    with pytest.raises(IndexError):
        fm[2]
    with pytest.raises(IndexError):
        fm[1, 2][0]


def test_scalar_mul(rect):
    fm, _, _, AB = rect
    for out in (fm * 2.5, 2.5 * fm, fm * np.float64(2.5), np.float32(2.5) * fm):
        assert isinstance(out, FactoredMatrix)
        assert out.AB.dtype == np.float32
        np.testing.assert_allclose(out.AB, 2.5 * AB, **TOL)
    with pytest.raises(ValueError, match="scalar"):
        fm * np.ones(3)
    with pytest.raises(TypeError):
        fm * "x"


def test_make_even_rect(rect):
    fm, _, _, AB = rect
    np.testing.assert_allclose(fm.make_even().AB, AB, rtol=1e-4, atol=1e-4)


def test_unsqueeze(rect):
    fm, _, _, AB = rect
    assert fm.unsqueeze(0).shape == (1, 2, 3, 8, 6)
    assert fm.unsqueeze(2).shape == (2, 3, 1, 8, 6)
    assert fm.unsqueeze(-3).shape == (2, 3, 1, 8, 6)
    np.testing.assert_allclose(fm.unsqueeze(1).AB, AB[:, None], **TOL)
    with pytest.raises(IndexError):
        fm.unsqueeze(-1)


def test_broadcasting(rng):
    A, B = _rand(rng, 8, 4), _rand(rng, 2, 3, 4, 6)
    fm = FactoredMatrix(A, B)
    assert fm.shape == (2, 3, 8, 6)
    assert fm.A.shape == (2, 3, 8, 4)
    np.testing.assert_allclose(fm.AB, A.astype(np.float64) @ B, **TOL)
    fm = FactoredMatrix(_rand(rng, 3, 1, 8, 4), _rand(rng, 5, 4, 6))
    assert fm.shape == (3, 5, 8, 6)
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(_rand(rng, 2, 8, 4), _rand(rng, 3, 4, 6))


def test_errors(rng, rect):
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(_rand(rng, 2, 3, 8, 4), _rand(rng, 2, 3, 5, 6))
    with pytest.raises(ValueError, match="at least 2 dims"):
        FactoredMatrix(_rand(rng, 4), _rand(rng, 4, 6))
    fm = rect[0]
    with pytest.raises(ValueError, match="ldim == rdim"):
        _ = fm.BA
    with pytest.raises(ValueError, match="ldim == rdim"):
        _ = fm.eigenvalues
