//! Vector operations of attention over an f16 KV cache: keys and values are stored as f16
//! bits (half the memory and half the bytes read per step of an f32 cache) and widened in
//! registers. Each operation picks AVX2 + FMA + F16C at run time when the CPU has them
//! (every AVX-512 CPU does), else portable code. The two paths agree to rounding (the SIMD
//! one fuses multiply and add and sums in its own lane order); conversions agree exactly,
//! both rounding to nearest even as F16C does.

use crate::f16::{f16_to_f32, f32_to_f16};

/// Appends `src` converted to f16 bits to `dst`.
pub fn extend_f16(dst: &mut Vec<u16>, src: &[f32]) {
    let at = dst.len();
    dst.resize(at + src.len(), 0);
    let out = &mut dst[at..];
    #[cfg(target_arch = "x86_64")]
    if crate::x86::to_f16(src, out) {
        return;
    }
    for (o, &x) in out.iter_mut().zip(src) {
        *o = f32_to_f16(x);
    }
}

/// Rounds every value of `x` to the nearest f16 (kept as f32).
pub fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::round_to_f16(x) {
        return;
    }
    for v in x {
        *v = f16_to_f32(f32_to_f16(*v));
    }
}

/// `Σ q[i] · k[i]` with `k` in f16 bits; `q` and `k` have the same length.
pub fn dot_f16(q: &[f32], k: &[u16]) -> f32 {
    assert_eq!(q.len(), k.len(), "dot_f16 operands differ in length");
    #[cfg(target_arch = "x86_64")]
    if let Some(d) = crate::x86::dot_f16(q, k) {
        return d;
    }
    q.iter().zip(k).map(|(&a, &b)| a * f16_to_f32(b)).sum()
}

/// `acc[i] += p · v[i]` with `v` in f16 bits; `acc` and `v` have the same length.
pub fn axpy_f16(acc: &mut [f32], p: f32, v: &[u16]) {
    assert_eq!(acc.len(), v.len(), "axpy_f16 operands differ in length");
    #[cfg(target_arch = "x86_64")]
    if crate::x86::axpy_f16(acc, p, v) {
        return;
    }
    for (a, &b) in acc.iter_mut().zip(v) {
        *a += p * f16_to_f32(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portable_dot(q: &[f32], k: &[u16]) -> f32 {
        q.iter().zip(k).map(|(&a, &b)| a * f16_to_f32(b)).sum()
    }

    /// Every length from 0 to 80 (the SIMD path's tails included): conversions exact, dot
    /// and axpy within rounding of the portable definitions.
    #[test]
    fn simd_and_portable_agree() {
        let mut rng = crate::tests::Rng::new(5);
        for n in 0..80 {
            let x: Vec<f32> = (0..n).map(|_| rng.f() * 3.0).collect();
            let mut bits = Vec::new();
            extend_f16(&mut bits, &x);
            let want: Vec<u16> = x.iter().map(|&v| f32_to_f16(v)).collect();
            assert_eq!(bits, want, "extend_f16, length {n}");
            let mut r = x.clone();
            round_to_f16(&mut r);
            let want: Vec<f32> = want.iter().map(|&h| f16_to_f32(h)).collect();
            assert_eq!(r, want, "round_to_f16, length {n}");

            let q: Vec<f32> = (0..n).map(|_| rng.f()).collect();
            let d = dot_f16(&q, &bits);
            let p = portable_dot(&q, &bits);
            assert!(
                (d - p).abs() <= 1e-5 * (1.0 + p.abs()),
                "dot, length {n}: {d} vs {p}"
            );
            let mut acc: Vec<f32> = (0..n).map(|_| rng.f()).collect();
            let mut want = acc.clone();
            axpy_f16(&mut acc, 0.37, &bits);
            for (w, &b) in want.iter_mut().zip(&bits) {
                *w += 0.37 * f16_to_f32(b);
            }
            for (a, w) in acc.iter().zip(&want) {
                assert!((a - w).abs() <= 1e-6 * (1.0 + w.abs()), "axpy, length {n}");
            }
        }
    }
}
