//! Scalar math shared by the kernels: an accurate `erf`/`erfc` (for exact GELU), a
//! vectorisable `exp` (softmax, cross-entropy), and fixed-order sums and dot products.
//!
//! Sums use a fixed number of independent lanes combined in a fixed tree: the compiler can
//! vectorise them (it may not reorder a plain sequential float sum), and the order, hence
//! the bits, depend only on the length.

// The erf coefficients are kept digit for digit as published (they round to the intended f64).
#![allow(clippy::excessive_precision)]

/// Lanes of the fixed-order reductions (two SSE or one AVX register of f32).
const LANES: usize = 8;

#[inline(always)]
fn hsum8(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

#[inline(always)]
fn lanes(x: &[f32]) -> &[f32; LANES] {
    // Only called on `chunks_exact(LANES)` items.
    x.try_into().expect("chunk of LANES elements")
}

/// `sum_i a[i] * b[i]` over the common length, in a fixed order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0.0f32; LANES];
    for (x, y) in ca.zip(cb) {
        let (x, y) = (lanes(x), lanes(y));
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    hsum8(acc) + tail
}

/// Block size of the two-level sums: f32 lanes within a block, f64 across blocks, so long
/// rows (a 50k vocabulary) keep ~f64 accuracy while the inner loop stays f32-vectorised.
const SUM_BLOCK: usize = 256;

/// `sum_i f(x[i])` with f32 lanes inside 256-element blocks and an f64 total.
#[inline(always)]
pub(crate) fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(SUM_BLOCK) {
        let c = block.chunks_exact(LANES);
        let r = c.remainder();
        let mut acc = [0.0f32; LANES];
        for v in c {
            let v = lanes(v);
            for l in 0..LANES {
                acc[l] += f(v[l]);
            }
        }
        let mut tail = 0.0f32;
        for &v in r {
            tail += f(v);
        }
        total += (hsum8(acc) + tail) as f64;
    }
    total
}

/// `sum_i x[i]` (f64 result, fixed order).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f64 {
    sum_map(x, |v| v)
}

/// `sum_i f(x[i])` accumulated entirely in f64 (four lanes, fixed order). Slower than
/// [`sum_map`] but exact enough for statistics of rows with a large common offset.
#[inline(always)]
pub(crate) fn sum_map_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let c = x.chunks_exact(4);
    let r = c.remainder();
    let mut acc = [0.0f64; 4];
    for v in c {
        for l in 0..4 {
            acc[l] += f(v[l] as f64);
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for &v in r {
        s += f(v as f64);
    }
    s
}

/// `sum_i exp(x[i] - shift)` (f64 result, fixed order).
#[inline(always)]
pub(crate) fn sum_exp(x: &[f32], shift: f32) -> f64 {
    sum_map(x, |v| exp(v - shift))
}

/// Largest element (NaN if any element is NaN, so a diverged row stays visible). Lanes make
/// it vectorise; a maximum is exact, so the lane order cannot change the result.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let c = x.chunks_exact(LANES);
    let r = c.remainder();
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut nan = [0u32; LANES];
    for v in c {
        let v = lanes(v);
        for l in 0..LANES {
            acc[l] = if v[l] > acc[l] { v[l] } else { acc[l] };
            nan[l] |= v[l].is_nan() as u32;
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut any_nan = nan.iter().any(|&b| b != 0);
    for &v in acc.iter().chain(r) {
        any_nan |= v.is_nan();
        m = if v > m { v } else { m };
    }
    if any_nan {
        f32::NAN
    } else {
        m
    }
}

/// `exp(x)` in f32, written so loops over it vectorise (no branches, no libm call).
///
/// Cephes `expf`: `x = n ln2 + r` with `|r| <= ln2 / 2` (ln2 split in two for an exact
/// reduction), a degree-7 polynomial for `e^r`, then exact scaling by `2^n` through the exponent
/// bits. Relative error below 2.5e-7 (≈ 2 ulp) on the whole range; results below the smallest
/// normal (`x < -87.34`) flush to 0, `x > 88.72` gives +inf and NaN propagates.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_84;
    const LO: f32 = -87.336_54;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer (ties to even), and
    // that integer can be read back from the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x > HI { HI } else { x };
    let xc = if xc < LO { LO } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // n in [-126, 128]: scale in two halves so each factor is a normal float.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let out = y * s1 * s2;
    if x < LO {
        0.0
    } else {
        out
    }
}

// ---- erf / erfc -------------------------------------------------------------------------------
//
// Ported from FreeBSD's s_erf.c (via musl and the Rust `libm` crate), to double precision
// (< 1 ulp). The original notice, which its licence asks to preserve:
//
// ====================================================
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this
// software is freely granted, provided that this notice
// is preserved.
// ====================================================
//
// Method (see the original for details): |x| < 0.84375: x + x R(x²) with R rational;
// [0.84375, 1.25): erf(1) + P1/Q1 of (|x| - 1); [1.25, 28): erfc = exp(-x² - 0.5625 + R/S) / x
// with R/S rational in 1/x² (two intervals); beyond: saturate.

const ERX: f64 = 8.450_629_115_104_675_292_97e-1;
#[cfg(test)]
const EFX8: f64 = 1.027_033_336_764_100_690_53;
const PP: [f64; 5] = [
    1.283_791_670_955_125_585_61e-1,
    -3.250_421_072_470_014_993_70e-1,
    -2.848_174_957_559_851_047_66e-2,
    -5.770_270_296_489_441_591_57e-3,
    -2.376_301_665_665_016_260_84e-5,
];
const QQ: [f64; 5] = [
    3.979_172_239_591_553_528_19e-1,
    6.502_224_998_876_729_444_85e-2,
    5.081_306_281_875_765_627_76e-3,
    1.324_947_380_043_216_445_26e-4,
    -3.960_228_278_775_368_123_20e-6,
];
const PA: [f64; 7] = [
    -2.362_118_560_752_659_440_77e-3,
    4.148_561_186_837_483_316_66e-1,
    -3.722_078_760_357_013_238_47e-1,
    3.183_466_199_011_617_536_74e-1,
    -1.108_946_942_823_966_774_76e-1,
    3.547_830_432_561_823_593_71e-2,
    -2.166_375_594_868_790_843_00e-3,
];
const QA: [f64; 6] = [
    1.064_208_804_008_442_282_86e-1,
    5.403_979_177_021_710_489_37e-1,
    7.182_865_441_419_626_628_68e-2,
    1.261_712_198_087_616_421_12e-1,
    1.363_708_391_202_905_073_62e-2,
    1.198_449_984_679_910_741_70e-2,
];
const RA: [f64; 8] = [
    -9.864_944_034_847_148_227_05e-3,
    -6.938_585_727_071_817_643_72e-1,
    -1.055_862_622_532_329_098_14e1,
    -6.237_533_245_032_600_603_96e1,
    -1.623_966_694_625_734_703_55e2,
    -1.846_050_929_067_110_359_94e2,
    -8.128_743_550_630_659_342_46e1,
    -9.814_329_344_169_145_485_92,
];
const SA: [f64; 8] = [
    1.965_127_166_743_925_712_92e1,
    1.376_577_541_435_190_426_00e2,
    4.345_658_774_752_292_288_21e2,
    6.453_872_717_332_678_803_36e2,
    4.290_081_400_275_678_333_86e2,
    1.086_350_055_417_794_351_34e2,
    6.570_249_770_319_281_701_35,
    -6.042_441_521_485_809_874_38e-2,
];
const RB: [f64; 7] = [
    -9.864_942_924_700_099_285_97e-3,
    -7.992_832_376_805_230_065_74e-1,
    -1.775_795_491_775_475_198_89e1,
    -1.606_363_848_558_219_160_62e2,
    -6.375_664_433_683_896_277_22e2,
    -1.025_095_131_611_077_249_54e3,
    -4.835_191_916_086_513_970_19e2,
];
const SB: [f64; 7] = [
    3.033_806_074_348_245_829_24e1,
    3.257_925_129_965_739_188_26e2,
    1.536_729_586_084_436_959_94e3,
    3.199_858_219_508_595_539_08e3,
    2.553_050_406_433_164_425_83e3,
    4.745_285_412_069_553_672_15e2,
    -2.244_095_244_658_581_833_62e1,
];

/// Horner evaluation of `c[0] + c[1] z + ... `.
#[inline(always)]
fn poly(z: f64, c: &[f64]) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * z + k)
}

/// `erfc(|x|)` for `0.84375 <= |x| < 28`.
fn erfc_tail(ax: f64) -> f64 {
    if ax < 1.25 {
        let s = ax - 1.0;
        let p = poly(s, &PA);
        let q = 1.0 + s * poly(s, &QA);
        return 1.0 - ERX - p / q;
    }
    let s = 1.0 / (ax * ax);
    let (r, big_s) =
        if ax < 1.0 / 0.35 { (poly(s, &RA), 1.0 + s * poly(s, &SA)) } else { (poly(s, &RB), 1.0 + s * poly(s, &SB)) };
    // z = ax with the low 32 bits cleared, so z*z is exact and exp(-z*z) is accurate.
    let z = f64::from_bits(ax.to_bits() & 0xFFFF_FFFF_0000_0000);
    (-z * z - 0.5625).exp() * ((z - ax) * (z + ax) + r / big_s).exp() / ax
}

/// The error function, double precision (< 1 ulp). Kernels only need [`erfc`]; the tests use
/// this as a cross-check.
#[cfg(test)]
pub(crate) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let y = if ax < 0.84375 {
        if ax < f64::from_bits(0x3e30_0000_0000_0000) {
            // |x| < 2^-28: erf(x) ≈ (2/√π) x.
            return 0.125 * (8.0 * x + EFX8 * x);
        }
        let z = x * x;
        return x + x * (poly(z, &PP) / (1.0 + z * poly(z, &QQ)));
    } else if ax < 6.0 {
        1.0 - erfc_tail(ax)
    } else {
        1.0
    };
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// The complementary error function `1 - erf(x)`, accurate also where it is tiny.
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    if ax < 0.84375 {
        if ax < f64::from_bits(0x3c70_0000_0000_0000) {
            return 1.0 - x;
        }
        let z = x * x;
        let y = poly(z, &PP) / (1.0 + z * poly(z, &QQ));
        return if x < 0.25 { 1.0 - (x + x * y) } else { 0.5 - (x - 0.5 + x * y) };
    }
    if ax < 28.0 {
        let t = erfc_tail(ax);
        return if x < 0.0 { 2.0 - t } else { t };
    }
    if x < 0.0 {
        2.0
    } else {
        0.0
    }
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π).
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_677_94;

/// Exact GELU `x Φ(x)` (PyTorch `gelu(approximate='none')`), evaluated in f64. `Φ` is written
/// with `erfc` so large negative inputs keep full relative precision.
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * 0.5 * erfc(-x * FRAC_1_SQRT_2)) as f32
}

/// `d/dx [x Φ(x)] = Φ(x) + x φ(x)`.
#[inline]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let cdf = 0.5 * erfc(-x * FRAC_1_SQRT_2);
    let pdf = (-0.5 * x * x).exp() * FRAC_1_SQRT_2PI;
    (cdf + x * pdf) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series (|x| <= 2) or the asymptotic continued fraction for erfc,
    /// in f64, as an independent reference.
    fn erf_ref(x: f64) -> f64 {
        if x.abs() <= 2.0 {
            // erf x = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
            let mut term = x;
            let mut s = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                let add = term / (2 * n + 1) as f64;
                s += add;
                if add.abs() < 1e-19 * s.abs() {
                    break;
                }
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            (1.0 - erfc_ref(x.abs())).copysign(x)
        }
    }

    /// erfc for x >= 2 by its continued fraction (evaluated backwards).
    fn erfc_ref(x: f64) -> f64 {
        // erfc x = exp(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = 0.0f64;
        for k in (1..200).rev() {
            f = (k as f64 / 2.0) / (x + f);
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }

    #[test]
    fn erf_matches_reference() {
        let mut worst = 0.0f64;
        for i in -600..=600 {
            let x = i as f64 * 0.01;
            let (a, b) = (erf(x), erf_ref(x));
            worst = worst.max((a - b).abs());
        }
        assert!(worst < 1e-14, "erf abs err {worst}");
        for i in 0..=200 {
            let x = 3.0 + i as f64 * 0.1;
            let (a, b) = (erfc(x), erfc_ref(x));
            assert!(((a - b) / b).abs() < 1e-12, "erfc({x}) = {a} vs {b}");
            assert_eq!(erfc(-x), 2.0 - erfc(x));
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(40.0), 1.0);
        assert_eq!(erf(-40.0), -1.0);
        assert!(erf(f64::NAN).is_nan());
        for x in [0.1, 0.5, 0.9, 1.2, 2.0] {
            assert!((erf(x) + erfc(x) - 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut i = 0u64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            i += 1;
            x = -87.3 + i as f32 * 0.001_37;
        }
        assert!(worst < 2.5e-7, "exp worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_values_and_grad() {
        // Reference values of x Φ(x).
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-7);
        assert!((gelu(-1.0) + 0.158_655_26).abs() < 1e-7);
        assert_eq!(gelu(0.0), 0.0);
        // Deep negative tail keeps relative accuracy: x Φ(x) at -10 ≈ -7.62e-23.
        assert!(((gelu(-10.0) as f64 + 7.619_853e-23) / 7.619_853e-23).abs() < 1e-5);
        for i in -80..=80 {
            let x = i as f64 * 0.1;
            let h = 1e-5;
            let f = |x: f64| x * 0.5 * (1.0 + erf(x / 2f64.sqrt()));
            let fd = (f(x + h) - f(x - h)) / (2.0 * h);
            assert!((gelu_grad(x as f32) as f64 - fd).abs() < 1e-6, "x={x}");
        }
    }

    #[test]
    fn sums_and_dot() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((dot(&x, &y) as f64 - want).abs() < 1e-4);
        let want: f64 = x.iter().map(|&a| a as f64).sum();
        assert!((sum(&x) - want).abs() < 1e-5);
        let want: f64 = x.iter().map(|&a| (a as f64 - 0.5).exp()).sum();
        assert!((sum_exp(&x, 0.5) - want).abs() / want < 1e-6);
        assert_eq!(max(&x), x.iter().cloned().fold(f32::MIN, f32::max));
        assert!(max(&[1.0, f32::NAN, 2.0]).is_nan());
    }
}
