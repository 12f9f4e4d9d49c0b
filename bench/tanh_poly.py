"""The soft cap's polynomial: fit q(s) of tanh(u) = u + u*s*q(s), s = u^2, |u| < 0.4, and check
it in f32 arithmetic against float64 over every |x| < 0.4*cap.

Run: python3 bench/tanh_poly.py (numpy). Prints the fitted cubic's f32 coefficients and, for the
cubic and the odd Taylor series to u^13, the largest error of cap*tanh(x/cap) in ulps of the
correctly rounded result, computed as the kernels do (u = x*inv, s = u*u, Horner with FMAs,
y = fma(x*s, q, x)).

With --short: the quadratic q on |u| < 0.3 (abi::TANH_Q_SHORT) and the cubic on |u| < 0.4, each
as the cluster kernels evaluate t = tanh(x/cap) since session 15: t = x*P(x^2), P's coefficients
q_(k-1)/cap^(2k+1) rounded once from f64 (kernels::set_softcap), Horner with FMAs; the largest
error of t in ulps of tanh(x/cap).

With --wide: q of degree 6 on |u| < 1 (abi::TANH_Q_WIDE, session 16), checked the same way.
"""

import sys

import numpy as np

F32 = np.float32
S_MAX = 0.16  # (0.4)^2
TAYLOR = [-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075]


def fma(a, b, c):
    """f32 FMA: the product of two f32 is exact in f64; one f64 rounding of the sum, then f32."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(F32)


def q_true(s):
    u = np.sqrt(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (np.tanh(u) / u - 1) / s
    return np.where(s < 1e-6, -1 / 3 + 2 / 15 * s - 17 / 315 * s * s, q)


def fit(degree, s_max=S_MAX, nodes=4000, rounds=30):
    """Least maximum of s*|q - q_true| (the error q puts into tanh(u)/u) by Lawson's reweighted
    least squares on Chebyshev nodes of [0, s_max]."""
    k = np.arange(nodes)
    s = s_max / 2 * (1 - np.cos(np.pi * (k + 0.5) / nodes))
    a = np.vander(s, degree + 1, increasing=True)
    target = q_true(s)
    w = np.ones(nodes)
    for _ in range(rounds):
        sw = np.sqrt(w) * s
        c, *_ = np.linalg.lstsq(a * sw[:, None], target * sw, rcond=None)
        e = np.abs(a @ c - target) * s
        w = np.maximum(w * e / (w * e).sum(), 1e-30)
    return [F32(v) for v in c]


def capped(x, inv, coefs):
    u = (x * inv).astype(F32)
    s = (u * u).astype(F32)
    q = np.full_like(s, F32(coefs[-1]))
    for c in coefs[-2::-1]:
        q = fma(q, s, np.full_like(s, F32(c)))
    return fma((x * s).astype(F32), q, x)


def max_ulps(coefs, cap):
    inv = F32(1) / F32(cap)
    x = np.linspace(-0.4 * cap * 0.99999, 0.4 * cap * 0.99999, 1_000_001).astype(F32)
    exact = cap * np.tanh(x.astype(np.float64) / cap)
    ulp = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
    return float(np.max(np.abs(capped(x, inv, coefs).astype(np.float64) - exact) / ulp))


def t_ulps(coefs, cap, widest):
    """The largest error of t = x*P(x^2) (as the cluster kernels take it) over |x/cap| < widest."""
    p = [F32(1 / cap)] + [F32(float(c) / cap ** (2 * k + 3)) for k, c in enumerate(coefs)]
    x = np.linspace(-widest * cap * 0.99999, widest * cap * 0.99999, 400_001).astype(F32)
    x2 = (x * x).astype(F32)
    v = np.full_like(x2, p[-1])
    for c in p[-2::-1]:
        v = fma(v, x2, np.full_like(x2, c))
    t = (x * v).astype(F32).astype(np.float64)
    exact = np.tanh(x.astype(np.float64) / cap)
    keep = np.abs(exact) > 1e-30
    ulp = np.spacing(np.abs(exact[keep]).astype(F32)).astype(np.float64)
    return float(np.max(np.abs(t[keep] - exact[keep]) / ulp))


def main():
    if "--wide" in sys.argv[1:]:
        wide = fit(6, s_max=1.0)
        print("degree-6 q on |u| < 1, f32:", ", ".join(repr(float(c)) for c in wide))
        for cap in (1.0, 5.0, 15.0, 30.0, 40.0, 50.0, 150.0):
            print(f"cap {cap}: t from the wide polynomial {t_ulps(wide, cap, 1.0):.2f} ulp (|u| < 1)")
        return
    if "--short" in sys.argv[1:]:
        cubic = fit(3)
        quadratic = fit(2, s_max=0.3**2)
        print("quadratic q on |u| < 0.3, f32:", ", ".join(repr(float(c)) for c in quadratic))
        for cap in (5.0, 15.0, 30.0, 40.0):
            print(
                f"cap {cap}: t from the quadratic {t_ulps(quadratic, cap, 0.3):.2f} ulp (|u| < 0.3), "
                f"from the cubic {t_ulps(cubic, cap, 0.4):.2f} ulp (|u| < 0.4)"
            )
        return
    cubic = fit(3)
    print("cubic q, f32:", ", ".join(repr(float(c)) for c in cubic))
    for cap in (5.0, 15.0, 30.0, 50.0):
        print(
            f"cap {cap}: cubic {max_ulps(cubic, cap):.3f} ulp, "
            f"Taylor to u^13 {max_ulps([F32(c) for c in TAYLOR], cap):.3f} ulp"
        )


if __name__ == "__main__":
    main()
