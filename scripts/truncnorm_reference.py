#!/usr/bin/env python3
"""High-precision reference table for candle_sbp::truncnorm.

Independent of the Rust code: it evaluates the textbook closed forms of the truncated
log-normal (KL from the log-uniform prior, E[theta], Var[theta] = E[theta^2] - E[theta]^2,
SNR, and the inverse-CDF sample) with mpmath at 100 significant digits, where the
cancellations that break f64 are harmless. Every row is recomputed at 140 digits and must
agree; a few rows are also checked against direct numerical quadrature of the defining
integrals.

Usage:  python3 scripts/truncnorm_reference.py > tests/data/truncnorm_reference.csv
Needs:  mpmath (pip install mpmath); runs in about a minute.
"""
import sys

import mpmath as mp

US = ("0.001", "0.5", "0.999")


def linspace(lo, hi, n):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def grids():
    """(a, b, mu values, log_sigma values) blocks; each includes the corners of its box."""
    mus = sorted(set(linspace(-30, 10, 21) + [-0.1, -4.5, -19.9, -20.1, 0.1, -10.0]))
    lss = sorted(set(linspace(-20, 5, 26) + [-1.2, -5.0, 4.9, -19.5]))
    yield (-20.0, 0.0, mus, lss)
    coarse_mu = linspace(-30, 10, 11)
    coarse_ls = linspace(-20, 5, 11)
    for a, b in ((-10.0, 0.0), (-4.0, 4.0), (-30.0, -2.0), (-20.0, 5.0)):
        yield (a, b, coarse_mu, coarse_ls)


def ncdf_diff(lo, hi):
    """Phi(hi) - Phi(lo) computed through the tail that keeps the digits."""
    s2 = mp.sqrt(2)
    if lo >= 0:
        return (mp.erfc(lo / s2) - mp.erfc(hi / s2)) / 2
    if hi <= 0:
        return (mp.erfc(-hi / s2) - mp.erfc(-lo / s2)) / 2
    return (mp.erf(hi / s2) - mp.erf(lo / s2)) / 2


def pdf(x):
    return mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)


def stats(a, b, mu, ls):
    a, b, mu, ls = (mp.mpf(v) for v in (a, b, mu, ls))
    s = mp.exp(ls)
    al, be = (a - mu) / s, (b - mu) / s
    z = ncdf_diff(al, be)
    entropy = mp.log(mp.sqrt(2 * mp.pi * mp.e) * s * z) + (al * pdf(al) - be * pdf(be)) / (2 * z)
    kl = mp.log(b - a) - entropy
    m1 = mp.exp(mu + s * s / 2) * ncdf_diff(al - s, be - s) / z
    m2 = mp.exp(2 * mu + 2 * s * s) * ncdf_diff(al - 2 * s, be - 2 * s) / z
    var = m2 - m1 * m1
    snr = m1 / mp.sqrt(var)
    samples = [sample(al, be, z, mu, s, mp.mpf(u)) for u in US]
    return kl, m1, snr, samples


def sample(al, be, z, mu, s, u):
    """mu + s * Phi^-1(Phi(al) + u Z), solved in the tail where the target lies."""
    s2 = mp.sqrt(2)
    if al >= 0:
        # Upper tail: ln Phic(y) = ln((1-u) Phic(al) + u Phic(be)).
        target = mp.log((1 - u) * mp.erfc(al / s2) / 2 + u * mp.erfc(be / s2) / 2)
        f = lambda y: mp.log(mp.erfc(y / s2) / 2) - target
        df = lambda y: -pdf(y) / (mp.erfc(y / s2) / 2)
        y = solve_monotone(f, df, al, be)
    elif be <= 0:
        # Lower tail: ln Phi(y) = ln((1-u) Phi(al) + u Phi(be)).
        target = mp.log((1 - u) * mp.erfc(-al / s2) / 2 + u * mp.erfc(-be / s2) / 2)
        f = lambda y: mp.log(mp.erfc(-y / s2) / 2) - target
        df = lambda y: pdf(y) / (mp.erfc(-y / s2) / 2)
        y = solve_monotone(f, df, al, be)
    else:
        p = (mp.erfc(-al / s2) / 2) + u * z
        y = s2 * mp.erfinv(2 * p - 1)
    return mu + s * y


def solve_monotone(f, df, lo, hi):
    """Newton with bisection safeguard for a monotone f with a root in [lo, hi]."""
    a, b = lo, hi
    fa = f(a)
    x = (a + b) / 2
    tol = mp.mpf(10) ** (-(mp.mp.dps - 15))
    for _ in range(5000):
        fx = f(x)
        if fx == 0:
            return x
        if (fx > 0) == (fa > 0):
            a, fa = x, fx
        else:
            b = x
        step = fx / df(x)
        nxt = x - step
        if not (a < nxt < b):
            nxt = (a + b) / 2
            step = x - nxt
        x = nxt
        if abs(step) <= tol * max(1, abs(x)) or b - a <= tol * max(1, abs(x)):
            return x
    sys.exit("solver did not converge")


def quadrature_check(a, b, mu, ls):
    """KL and SNR from numerical integration of the defining integrals."""
    a, b, mu, ls = (mp.mpf(v) for v in (a, b, mu, ls))
    s = mp.exp(ls)
    dens = lambda x: mp.exp(-((x - mu) / s) ** 2 / 2)
    pts = sorted(set([a, b] + [min(max(mu + k * s, a), b) for k in (-8, -2, 0, 2, 8)]))
    z = mp.quad(dens, pts)
    q = lambda x: dens(x) / z
    ent = -mp.quad(lambda x: q(x) * mp.log(q(x)) if q(x) > 0 else 0, pts)
    m1 = mp.quad(lambda x: q(x) * mp.exp(x), pts)
    m2c = mp.quad(lambda x: q(x) * (mp.exp(x) - m1) ** 2, pts)
    return mp.log(b - a) - ent, m1 / mp.sqrt(m2c)


def main():
    rows = []
    for a, b, mus, lss in grids():
        for mu in mus:
            for ls in lss:
                mp.mp.dps = 100
                kl, mean, snr, smp = stats(a, b, mu, ls)
                mp.mp.dps = 140
                kl2, mean2, snr2, smp2 = stats(a, b, mu, ls)
                for x, y in [(kl, kl2), (mean, mean2), (snr, snr2)] + list(zip(smp, smp2)):
                    if abs(x - y) > mp.mpf("1e-40") * max(1, abs(y)):
                        sys.exit(f"precision check failed at a={a} b={b} mu={mu} ls={ls}")
                rows.append((a, b, mu, ls, kl2, mean2, snr2, smp2))
    # Direct quadrature of the definitions at moderate points, as an independent check
    # of the closed forms themselves.
    mp.mp.dps = 30
    for a, b, mu, ls in [(-20, 0, -3, 0), (-20, 0, -0.5, -1), (-20, 0, -15, 1), (-4, 4, 1, 0.5)]:
        mp.mp.dps = 30
        kl_q, snr_q = quadrature_check(a, b, mu, ls)
        mp.mp.dps = 100
        kl, _, snr, _ = stats(a, b, mu, ls)
        if abs(kl_q / kl - 1) > 1e-15 or abs(snr_q / snr - 1) > 1e-15:
            sys.exit(f"closed form disagrees with quadrature at {a} {b} {mu} {ls}")
    print("# mpmath " + mp.__version__ + ", 140 digits; u columns: log theta at u = " + " ".join(US))
    print("a,b,mu,log_sigma,kl,mean,snr," + ",".join(f"log_theta_u{i}" for i in range(len(US))))
    for a, b, mu, ls, kl, mean, snr, smp in rows:
        vals = [mp.nstr(v, 20) for v in (kl, mean, snr, *smp)]
        print(f"{a!r},{b!r},{mu!r},{ls!r}," + ",".join(vals))


if __name__ == "__main__":
    main()
