"""Linear operators: A agrees with matrix(), At is the adjoint, pinv is the Moore-Penrose inverse
(A pinv A = A, and equal to LAPACK's), the SVD reconstructs A with an orthogonal V, dtype and
device follow the input, the mask builders, observe(), and errors that name the bad value."""
import pytest
import torch

from sde_diffusion.inverse import (BlockAverage, Colorization, Dense, LinearOperator, Mask, box_mask,
                                   half_mask, observe, random_pixel_mask)


def _operators():
    g = torch.Generator().manual_seed(0)
    return {
        "mask_pixels": Mask(random_pixel_mask((3, 4, 4), keep=0.3, seed=1)),
        "mask_half": Mask(half_mask((2, 4, 4), "lower-half")),
        "mask_box": Mask(box_mask((1, 6, 6), 2)),
        "mask_1d": Mask(half_mask((6,))),
        "color": Colorization((3, 4, 4)),
        "color4": Colorization((4, 2, 3)),
        "block": BlockAverage(2, (3, 4, 4)),
        "block3": BlockAverage(3, (6, 6)),
        "dense": Dense(torch.randn(5, 12, generator=g), in_shape=(3, 2, 2)),
        "dense_wide": Dense(torch.randn(7, 4, generator=g)),
    }


OPS = _operators()


def _xy(op, batch=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(op.in_shape), generator=g, dtype=dtype)
    y = torch.randn((batch,) + tuple(op.out_shape), generator=g, dtype=dtype)
    return x, y


@pytest.mark.parametrize("name", sorted(OPS))
def test_apply_adjoint_pinv_svd_match_the_matrix(name):
    op = OPS[name]
    M = op.matrix()
    assert M.shape == (op.out_dim, op.in_dim) and M.dtype == torch.float64
    x, y = _xy(op)
    xf, yf = x.reshape(3, -1), y.reshape(3, -1)
    torch.testing.assert_close(op.A(x).reshape(3, -1), xf @ M.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.At(y).reshape(3, -1), yf @ M, rtol=0, atol=1e-12)
    # <A x, y> = <x, At y>
    torch.testing.assert_close((op.A(x) * y).flatten(1).sum(1), (x * op.At(y)).flatten(1).sum(1),
                               rtol=0, atol=1e-12)
    # pinv: the Moore-Penrose inverse (A pinv A = A; equal to LAPACK's pinv)
    torch.testing.assert_close(op.pinv(y).reshape(3, -1), yf @ torch.linalg.pinv(M).T, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.A(op.pinv(op.A(x))), op.A(x), rtol=0, atol=1e-12)
    # the SVD: V orthogonal, A = U[:, :k] diag(s) V[:, :k]^T
    svd = op.svd()
    k = svd.singular_values.shape[0]
    assert k <= min(op.in_dim, op.out_dim)
    Vt = svd.Vt(torch.eye(op.in_dim, dtype=torch.float64)).T          # rows: the right vectors
    U = svd.U(torch.eye(op.out_dim, dtype=torch.float64)).T
    torch.testing.assert_close(Vt @ Vt.T, torch.eye(op.in_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(op.out_dim, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(U[:, :k] @ torch.diag(svd.singular_values) @ Vt[:k], M, rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.V(svd.Vt(xf)), xf, rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.Ut(svd.U(yf)), yf, rtol=0, atol=1e-12)
    # the row-space projection is idempotent and symmetric
    P = op.row_space(torch.eye(op.in_dim, dtype=torch.float64).reshape((-1,) + tuple(op.in_shape)))
    P = P.reshape(op.in_dim, op.in_dim)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)


def test_a_wrong_adjoint_is_caught():
    """The adjoint check fails on a broken variant (pinv used as At for a block average)."""
    op = OPS["block"]
    x, y = _xy(op)
    lhs = (op.A(x) * y).sum()
    assert abs(float(lhs - (x * op.pinv(y)).sum())) > 1e-3
    assert abs(float(lhs - (x * op.At(y)).sum())) < 1e-12


@pytest.mark.parametrize("name", ["mask_pixels", "color", "block", "dense"])
def test_dtype_follows_the_input(name):
    op = OPS[name]
    x, y = _xy(op, dtype=torch.float32)
    for out in (op.A(x), op.At(y), op.pinv(y), op.row_space(x)):
        assert out.dtype == torch.float32
    torch.testing.assert_close(op.A(x).double(), op.A(x.double()), rtol=1e-5, atol=1e-5)


def test_structured_operators_know_their_inverses():
    assert Mask(half_mask((4,))).out_shape == (2,)
    c = Colorization((3, 2, 2))
    x = torch.rand(2, 3, 2, 2)
    torch.testing.assert_close(c.A(x), x.mean(1, keepdim=True))
    torch.testing.assert_close(c.pinv(c.A(x)), x.mean(1, keepdim=True).expand_as(x))
    torch.testing.assert_close(c.svd().singular_values, torch.full((4,), 3 ** -0.5, dtype=torch.float64))
    # the first spectral coordinates are the grey axis (x_R + x_G + x_B)/sqrt(3)
    torch.testing.assert_close(c.svd().Vt(x.reshape(2, -1))[:, :4], x.sum(1).reshape(2, -1) / 3 ** 0.5)
    b = BlockAverage(2, (1, 4, 4))
    img = torch.arange(16.).reshape(1, 1, 4, 4)
    torch.testing.assert_close(b.A(img), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    torch.testing.assert_close(b.pinv(b.A(img))[0, 0, :2, :2], torch.full((2, 2), 2.5))
    for op in (Mask(half_mask((4,))), c, b, OPS["dense"]):
        assert op.supports("pinv") and op.supports("svd")


def test_mask_builders():
    m = half_mask((1, 4, 4), "lower-half")
    assert m[0, :2].all() and not m[0, 2:].any()
    assert half_mask((1, 4, 4), "right-half")[0, :, :2].all() and not half_mask((1, 4, 4), "right-half")[0, :, 2:].any()
    assert half_mask((1, 4, 4), "upper-half")[0, 2:].all() and not half_mask((1, 4, 4), "upper-half")[0, :2].any()
    b = box_mask((2, 8, 8))                  # centred 4 x 4 box, all channels
    assert int((~b).sum()) == 2 * 16 and not b[:, 2:6, 2:6].any()
    r = random_pixel_mask((3, 10, 10), keep=0.25, seed=3)
    assert int(r[0].sum()) == 25 and torch.equal(r[0], r[1]) and torch.equal(r, random_pixel_mask((3, 10, 10), 0.25, 3))
    assert int(random_pixel_mask((3, 10, 10), 0.25, 3, per_channel=True).sum()) == 75
    with pytest.raises(ValueError, match="lower-half"):
        half_mask((4, 4), "bottom")
    with pytest.raises(ValueError, match="does not fit"):
        box_mask((4, 4), (2, 2, 3, 1))
    with pytest.raises(ValueError, match="observes nothing"):
        Mask(torch.zeros(3, dtype=torch.bool))


def test_shape_errors_name_both_shapes():
    op = OPS["block"]
    with pytest.raises(ValueError, match=r"\(batch, 3, 4, 4\), got \(2, 3, 5, 4\)"):
        op.A(torch.zeros(2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\(batch, 3, 2, 2\)"):
        op.At(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="factor 3 must divide"):
        BlockAverage(3, (1, 4, 4))
    with pytest.raises(ValueError, match="12 columns"):
        Dense(torch.zeros(2, 12), in_shape=(5,))


def test_an_operator_without_pinv_says_so():
    class Twice(LinearOperator):
        in_shape = out_shape = torch.Size((3,))

        def _a(self, xf):
            return 2 * xf

        def _at(self, yf):
            return 2 * yf

    op = Twice()
    assert not op.supports("pinv") and op.supports("svd")
    with pytest.raises(NotImplementedError, match="Twice"):
        op.pinv(torch.zeros(1, 3))
    torch.testing.assert_close(op.matrix(), 2 * torch.eye(3, dtype=torch.float64))
    assert op.svd().singular_values.tolist() == [2.0, 2.0, 2.0]


def test_observe_noise_is_seeded_and_per_sample():
    op = OPS["color"]
    x, _ = _xy(op, batch=6)
    torch.testing.assert_close(observe(op, x, 0.0), op.A(x), rtol=0, atol=0)
    y1, y2 = observe(op, x, 0.1, 7), observe(op, x[:3], 0.1, 7)
    torch.testing.assert_close(y1[:3], y2, rtol=0, atol=0)          # a sample's noise: seed and index
    resid = (observe(op, x.repeat(200, 1, 1, 1), 0.1, 1) - op.A(x.repeat(200, 1, 1, 1)))
    assert abs(float(resid.std()) - 0.1) < 0.005
    with pytest.raises(ValueError, match="sigma_y"):
        observe(op, x, -1.0)
