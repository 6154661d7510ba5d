//! x86-64 kernels: AVX-512 VNNI (512- and 256-bit) and AVX2. All of the crate's `unsafe` and
//! `std::arch` live in this module.
//!
//! Each kernel computes one tile row (16 weight rows) for `N` activation rows at once: it
//! loads and unpacks a block of the tile once and feeds it to all `N` rows, so the weight
//! unpack cost is shared (the "batched" path). Bounds are checked with safe slicing; the only
//! `unsafe` is the unaligned vector loads and stores on fixed-size arrays, and the calls into
//! `#[target_feature]` functions after run-time detection.

use std::arch::x86_64::*;

use crate::Isa;
use crate::blocks::{QK, QuantizedActs};
use crate::pack::{TILE_ROWS, TileLayout, WeightFormat};

const Q40: u8 = 0;
const Q41: u8 = 1;
const Q80: u8 = 2;

/// What one kernel call reads.
struct Args<'a> {
    l: &'a TileLayout,
    tr: &'a [u8],
    /// The tile row the caller will do next (prefetched while this one is computed).
    next: &'a [u8],
    acts: &'a QuantizedActs,
    j0: usize,
}

/// One activation row's blocks; every slice is exactly `nb` long (checked in `Args::row`),
/// which lets the compiler drop the bounds checks in the kernels' block loops.
struct ActRow<'a> {
    q: &'a [[i8; QK]],
    d: &'a [f32],
    s: &'a [f32],
    isum: &'a [i32],
}

impl ActRow<'_> {
    /// The 32 quants, scale, `s` and Σq of block `b`.
    #[inline(always)]
    fn at(&self, b: usize) -> (&[i8; QK], f32, f32, i32) {
        (&self.q[b], self.d[b], self.s[b], self.isum[b])
    }
}

/// The tile row's quants, d and m (d again for formats without m), one entry per block.
struct TileView<'a, const QB: usize> {
    q: &'a [[u8; QB]],
    d: &'a [[u8; 32]],
    m: &'a [[u8; 32]],
}

/// The common block count of a tile view and activation rows, asserted where the kernels'
/// loops can see it so the per-block indexing needs no further checks.
#[inline(always)]
fn same_len<const QB: usize, const N: usize>(t: &TileView<QB>, rows: &[ActRow; N]) -> usize {
    let nb = t.q.len();
    assert!(t.d.len() == nb && t.m.len() == nb);
    for r in rows {
        assert!(r.q.len() == nb && r.d.len() == nb && r.s.len() == nb && r.isum.len() == nb);
    }
    nb
}

impl Args<'_> {
    fn row(&self, j: usize) -> ActRow<'_> {
        let nb = self.l.nb;
        let (q, _) = self.acts.qs[j * nb * QK..(j + 1) * nb * QK].as_chunks::<QK>();
        let r = ActRow {
            q,
            d: &self.acts.d[j * nb..(j + 1) * nb],
            s: &self.acts.s[j * nb..(j + 1) * nb],
            isum: &self.acts.isum[j * nb..(j + 1) * nb],
        };
        assert!(r.q.len() == nb && r.d.len() == nb && r.s.len() == nb && r.isum.len() == nb);
        r
    }

    fn tile<const QB: usize>(&self) -> TileView<'_, QB> {
        let (l, nb) = (self.l, self.l.nb);
        let m_off = if l.format.has_min() { l.m_off } else { l.d_off };
        let t = TileView {
            q: self.tr[..nb * QB].as_chunks::<QB>().0,
            d: self.tr[l.d_off..l.d_off + nb * 32].as_chunks::<32>().0,
            m: self.tr[m_off..m_off + nb * 32].as_chunks::<32>().0,
        };
        assert!(t.q.len() == nb && t.d.len() == nb && t.m.len() == nb);
        t
    }
}

/// Four activation quants `4g .. 4g + 4` as one little-endian i32 (for a broadcast).
#[inline(always)]
fn quad(a: &[i8; QK], g: usize) -> i32 {
    i32::from_le_bytes([
        a[4 * g] as u8,
        a[4 * g + 1] as u8,
        a[4 * g + 2] as u8,
        a[4 * g + 3] as u8,
    ])
}

/// Asks for the next tile row's lines of block `b` (quants, and d/m every other block), one
/// tile row ahead of use: a single sequential stream the hardware prefetcher alone keeps
/// too short at one activation row. Only the first group of activation rows issues it.
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_block<const QB: usize>(a: &Args, b: usize) {
    if a.j0 != 0 {
        return;
    }
    // A hint only: it never faults, so the address needs no bounds check (it lies inside
    // `next`, which has this tile row's layout).
    let fetch =
        |o: usize| _mm_prefetch::<_MM_HINT_T0>(a.next.as_ptr().wrapping_add(o).cast::<i8>());
    for g in 0..QB / 64 {
        fetch(b * QB + 64 * g);
    }
    if b.is_multiple_of(2) {
        fetch(a.l.d_off + 32 * b);
        if a.l.format.has_min() {
            fetch(a.l.m_off + 32 * b);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load512(p: &[u8]) -> __m512i {
    let p: &[u8; 64] = p[..64].try_into().expect("64 bytes");
    // SAFETY: `p` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx")]
fn load256(p: &[u8]) -> __m256i {
    let p: &[u8; 32] = p[..32].try_into().expect("32 bytes");
    // SAFETY: `p` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
fn load128(p: &[u8]) -> __m128i {
    let p: &[u8; 16] = p[..16].try_into().expect("16 bytes");
    // SAFETY: `p` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store512(out: &mut [f32; TILE_ROWS], v: __m512) {
    // SAFETY: `out` is 16 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx")]
fn store256(out: &mut [f32], v: __m256) {
    let out: &mut [f32; 8] = (&mut out[..8]).try_into().expect("8 floats");
    // SAFETY: `out` is 8 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

/// 512-bit VNNI: one `vpdpbusd` per 4 columns covers all 16 rows of the tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn vnni512<const F: u8, const QB: usize, const N: usize>(a: &Args, out: &mut [[f32; TILE_ROWS]]) {
    let mask = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut accm = [_mm512_setzero_ps(); N];
    let t = a.tile::<QB>();
    let rows: [ActRow; N] = std::array::from_fn(|n| a.row(a.j0 + n));
    let nb = same_len(&t, &rows);
    for b in 0..nb {
        prefetch_block::<QB>(a, b);
        let q = &t.q[b];
        let mut w = [_mm512_setzero_si512(); 8];
        if F == Q80 {
            for (g, w) in w.iter_mut().enumerate() {
                *w = load512(&q[64 * g..]);
            }
        } else {
            for g in 0..4 {
                let v = load512(&q[64 * g..]);
                w[g] = _mm512_and_si512(v, mask);
                w[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
            }
        }
        let dx = _mm512_cvtph_ps(load256(&t.d[b]));
        let mx = if F == Q41 {
            _mm512_cvtph_ps(load256(&t.m[b]))
        } else {
            _mm512_setzero_ps()
        };
        for n in 0..N {
            let (aq, dy, sy, isum) = rows[n].at(b);
            let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for g in (0..8).step_by(2) {
                s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(quad(aq, g)));
                s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(quad(aq, g + 1)));
            }
            let mut si = _mm512_add_epi32(s0, s1);
            if F == Q40 {
                si = _mm512_sub_epi32(si, _mm512_set1_epi32(8 * isum));
            } else if F == Q80 {
                si = _mm512_sub_epi32(si, _mm512_set1_epi32(128 * isum));
            }
            let scale = _mm512_mul_ps(dx, _mm512_set1_ps(dy));
            acc[n] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(si), acc[n]);
            if F == Q41 {
                accm[n] = _mm512_fmadd_ps(mx, _mm512_set1_ps(sy), accm[n]);
            }
        }
    }
    for n in 0..N {
        let r = if F == Q41 {
            _mm512_add_ps(acc[n], accm[n])
        } else {
            acc[n]
        };
        store512(&mut out[n], r);
    }
}

/// 256-bit VNNI: the tile in two halves of 8 rows (the upper and lower 32 bytes of a chunk).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn vnni256<const F: u8, const QB: usize, const N: usize>(a: &Args, out: &mut [[f32; TILE_ROWS]]) {
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let mut accm = [[_mm256_setzero_ps(); 2]; N];
    let t = a.tile::<QB>();
    let rows: [ActRow; N] = std::array::from_fn(|n| a.row(a.j0 + n));
    let nb = same_len(&t, &rows);
    for b in 0..nb {
        prefetch_block::<QB>(a, b);
        for h in 0..2 {
            let w = weights256::<F, QB>(&t.q[b], h);
            let (dx, mx) = scales256::<F>(&t.d[b], &t.m[b], h);
            for n in 0..N {
                let (aq, dy, sy, isum) = rows[n].at(b);
                let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for g in (0..8).step_by(2) {
                    s0 = _mm256_dpbusd_epi32(s0, w[g], _mm256_set1_epi32(quad(aq, g)));
                    s1 = _mm256_dpbusd_epi32(s1, w[g + 1], _mm256_set1_epi32(quad(aq, g + 1)));
                }
                let mut si = _mm256_add_epi32(s0, s1);
                if F == Q40 {
                    si = _mm256_sub_epi32(si, _mm256_set1_epi32(8 * isum));
                } else if F == Q80 {
                    si = _mm256_sub_epi32(si, _mm256_set1_epi32(128 * isum));
                }
                accumulate256::<F>(&mut acc[n][h], &mut accm[n][h], dx, mx, si, dy, sy);
            }
        }
    }
    store_all256::<F, N>(&acc, &accm, out);
}

/// AVX2 without VNNI: `vpmaddubsw` + `vpmaddwd`. For 4-bit weights (0..15) and |a| <= 127 a
/// pair sum is at most 3810, so all eight products of a block add up in i16 (<= 30480) before
/// one widening. For Q8_0 the weight is made signed again and the sign moved onto the
/// activation (|w| <= 128, pair sum <= 32512, no saturation), widened per product.
#[target_feature(enable = "avx2,fma,f16c")]
fn avx2<const F: u8, const QB: usize, const N: usize>(a: &Args, out: &mut [[f32; TILE_ROWS]]) {
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let mut accm = [[_mm256_setzero_ps(); 2]; N];
    let t = a.tile::<QB>();
    let rows: [ActRow; N] = std::array::from_fn(|n| a.row(a.j0 + n));
    let nb = same_len(&t, &rows);
    for b in 0..nb {
        prefetch_block::<QB>(a, b);
        for h in 0..2 {
            // Q4: unsigned nibbles. Q8: `w` signed weights, `aw` their magnitudes.
            let mut w = weights256::<F, QB>(&t.q[b], h);
            let mut aw = [_mm256_setzero_si256(); 8];
            if F == Q80 {
                for (w, aw) in w.iter_mut().zip(aw.iter_mut()) {
                    *w = _mm256_xor_si256(*w, flip);
                    *aw = _mm256_abs_epi8(*w);
                }
            }
            let (dx, mx) = scales256::<F>(&t.d[b], &t.m[b], h);
            for n in 0..N {
                let (aq, dy, sy, isum) = rows[n].at(b);
                let mut si;
                if F == Q80 {
                    si = _mm256_setzero_si256();
                    for g in 0..8 {
                        let sa = _mm256_sign_epi8(_mm256_set1_epi32(quad(aq, g)), w[g]);
                        let p = _mm256_maddubs_epi16(aw[g], sa);
                        si = _mm256_add_epi32(si, _mm256_madd_epi16(p, ones));
                    }
                } else {
                    let mut s16 = _mm256_setzero_si256();
                    for (g, w) in w.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(*w, _mm256_set1_epi32(quad(aq, g)));
                        s16 = _mm256_add_epi16(s16, p);
                    }
                    si = _mm256_madd_epi16(s16, ones);
                    if F == Q40 {
                        si = _mm256_sub_epi32(si, _mm256_set1_epi32(8 * isum));
                    }
                }
                accumulate256::<F>(&mut acc[n][h], &mut accm[n][h], dx, mx, si, dy, sy);
            }
        }
    }
    store_all256::<F, N>(&acc, &accm, out);
}

/// The 16 rows' d (and m for Q4_1) of block `b`, half `h` (rows 8h .. 8h + 8), as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn scales256<const F: u8>(d: &[u8; 32], m: &[u8; 32], h: usize) -> (__m256, __m256) {
    let dx = _mm256_cvtph_ps(load128(&d[16 * h..]));
    let mx = if F == Q41 {
        _mm256_cvtph_ps(load128(&m[16 * h..]))
    } else {
        _mm256_setzero_ps()
    };
    (dx, mx)
}

/// Unsigned weights of block `b`, half `h`: nibbles split into columns, or Q8_0's raw bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn weights256<const F: u8, const QB: usize>(q: &[u8; QB], h: usize) -> [__m256i; 8] {
    let mut w = [_mm256_setzero_si256(); 8];
    if F == Q80 {
        for (g, w) in w.iter_mut().enumerate() {
            *w = load256(&q[64 * g + 32 * h..]);
        }
    } else {
        let mask = _mm256_set1_epi8(0x0f);
        for g in 0..4 {
            let v = load256(&q[64 * g + 32 * h..]);
            w[g] = _mm256_and_si256(v, mask);
            w[g + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        }
    }
    w
}

/// `acc = fma(dx * dy, si, acc)`, `accm = fma(mx, sy, accm)` (Q4_1): the shared epilogue.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn accumulate256<const F: u8>(
    acc: &mut __m256,
    accm: &mut __m256,
    dx: __m256,
    mx: __m256,
    si: __m256i,
    dy: f32,
    sy: f32,
) {
    let scale = _mm256_mul_ps(dx, _mm256_set1_ps(dy));
    *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(si), *acc);
    if F == Q41 {
        *accm = _mm256_fmadd_ps(mx, _mm256_set1_ps(sy), *accm);
    }
}

/// Writes `acc (+ accm)` for both halves of every activation row.
#[inline]
#[target_feature(enable = "avx2")]
fn store_all256<const F: u8, const N: usize>(
    acc: &[[__m256; 2]; N],
    accm: &[[__m256; 2]; N],
    out: &mut [[f32; TILE_ROWS]],
) {
    for n in 0..N {
        for h in 0..2 {
            let r = if F == Q41 {
                _mm256_add_ps(acc[n][h], accm[n][h])
            } else {
                acc[n][h]
            };
            store256(&mut out[n][8 * h..], r);
        }
    }
}

/// AVX2 activation quantizer, the same steps as llama.cpp's x86 `quantize_row_q8_1`:
/// (amax, quants, Σq) for one block; equal to `blocks::quantize_block_scalar` for finite
/// input. The caller checked `Isa::Avx2.is_available()`.
pub(crate) fn quantize_block(x: &[f32; QK]) -> (f32, [i8; QK], i32) {
    debug_assert!(Isa::Avx2.is_available());
    // SAFETY: every caller checks `Isa::Avx2.is_available()` (AVX2 detected at run time).
    unsafe { quantize_block_avx2(x) }
}

#[target_feature(enable = "avx2")]
fn quantize_block_avx2(x: &[f32; QK]) -> (f32, [i8; QK], i32) {
    let v: [__m256; 4] = std::array::from_fn(|i| {
        let p: &[f32; 8] = x[8 * i..8 * i + 8].try_into().expect("8 floats");
        // SAFETY: `p` is 8 readable f32; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_ps(p.as_ptr()) }
    });
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for v in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(v[i], id),
        );
        _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi)
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)));
    // Pack i32 -> i16 -> i8; AVX2 packs work per 128-bit lane, the permute restores order.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut qs = [0i8; QK];
    // SAFETY: `qs` is 32 writable bytes; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), p) };
    (amax, qs, sum)
}

/// Runs `isa`'s kernel for one tile row, activation rows `j0 .. j0 + out.len()`.
/// Panics if `isa` is not available on this CPU or the shapes disagree (the public API has
/// already validated them, so a panic here is a bug).
pub(crate) fn tile_row(
    isa: Isa,
    l: &TileLayout,
    tr: &[u8],
    next: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    out: &mut [[f32; TILE_ROWS]],
) {
    assert!(isa.is_available(), "{isa:?} is not available on this CPU");
    assert!(tr.len() >= l.used && acts.k == l.nb * QK && j0 + out.len() <= acts.rows);
    let mut j = 0;
    while j < out.len() {
        let rem = out.len() - j;
        let n = if rem >= 8 {
            8
        } else if rem >= 4 {
            4
        } else {
            rem
        };
        let a = Args {
            l,
            tr,
            next,
            acts,
            j0: j0 + j,
        };
        let o = &mut out[j..j + n];
        match l.format {
            WeightFormat::Q4_0 => run::<Q40, 256>(isa, n, &a, o),
            WeightFormat::Q4_1 => run::<Q41, 256>(isa, n, &a, o),
            WeightFormat::Q8_0 => run::<Q80, 512>(isa, n, &a, o),
        }
        j += n;
    }
}

fn run<const F: u8, const QB: usize>(isa: Isa, n: usize, a: &Args, o: &mut [[f32; TILE_ROWS]]) {
    // SAFETY: `tile_row` asserted `isa.is_available()`, i.e. run-time detection found every
    // feature these functions enable (see `Isa::is_available`). They touch memory only
    // through bounds-checked slices and the documented loads and stores above.
    unsafe {
        match (isa, n) {
            (Isa::Avx512Vnni512, 8) => vnni512::<F, QB, 8>(a, o),
            (Isa::Avx512Vnni512, 4) => vnni512::<F, QB, 4>(a, o),
            (Isa::Avx512Vnni512, 3) => vnni512::<F, QB, 3>(a, o),
            (Isa::Avx512Vnni512, 2) => vnni512::<F, QB, 2>(a, o),
            (Isa::Avx512Vnni512, 1) => vnni512::<F, QB, 1>(a, o),
            (Isa::Avx512Vnni256, 8) => vnni256::<F, QB, 8>(a, o),
            (Isa::Avx512Vnni256, 4) => vnni256::<F, QB, 4>(a, o),
            (Isa::Avx512Vnni256, 3) => vnni256::<F, QB, 3>(a, o),
            (Isa::Avx512Vnni256, 2) => vnni256::<F, QB, 2>(a, o),
            (Isa::Avx512Vnni256, 1) => vnni256::<F, QB, 1>(a, o),
            (Isa::Avx2, 8) => avx2::<F, QB, 8>(a, o),
            (Isa::Avx2, 4) => avx2::<F, QB, 4>(a, o),
            (Isa::Avx2, 3) => avx2::<F, QB, 3>(a, o),
            (Isa::Avx2, 2) => avx2::<F, QB, 2>(a, o),
            (Isa::Avx2, 1) => avx2::<F, QB, 1>(a, o),
            (isa, n) => unreachable!("no x86 kernel for {isa:?} with {n} rows"),
        }
    }
}

/// f32 to f16 bits, eight at a time with F16C (round to nearest even), the tail by hand
/// (which rounds identically).
pub(crate) fn to_f16(src: &[f32], dst: &mut [u16]) -> bool {
    #[target_feature(enable = "avx2,f16c")]
    fn inner(src: &[f32], dst: &mut [u16]) {
        let (s8, d8) = (src.chunks_exact(8), dst.chunks_exact_mut(8));
        let (s_tail, d_tail) = (s8.remainder(), d8.into_remainder());
        for (o, &x) in d_tail.iter_mut().zip(s_tail) {
            *o = crate::f16::f32_to_f16(x);
        }
        for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
            // SAFETY: `s` is 8 f32 and `d` 8 u16 (chunks_exact), exactly what the unaligned
            // 256-bit load and 128-bit store touch.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
                _mm_storeu_si128(d.as_mut_ptr().cast(), h);
            }
        }
    }
    // The one check per call (a cached lookup): the safe signature rests on it.
    if !Isa::Avx2.is_available() {
        return false;
    }
    // SAFETY: AVX2 with F16C was detected just above.
    unsafe { inner(src, dst) };
    true
}

/// Rounds each value to the nearest f16 and back, eight at a time.
pub(crate) fn round_to_f16(x: &mut [f32]) -> bool {
    #[target_feature(enable = "avx2,f16c")]
    fn inner(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` is 8 f32 (chunks_exact_mut): the load and the store touch only it.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for v in chunks.into_remainder() {
            *v = crate::f16::f16_to_f32(crate::f16::f32_to_f16(*v));
        }
    }
    // The one check per call (a cached lookup): the safe signature rests on it.
    if !Isa::Avx2.is_available() {
        return false;
    }
    // SAFETY: AVX2 with F16C was detected just above.
    unsafe { inner(x) };
    true
}

/// `Σ q[i] · k[i]`, `k` in f16 bits, with two 8-lane FMA accumulators.
pub(crate) fn dot_f16(q: &[f32], k: &[u16]) -> Option<f32> {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner(q: &[f32], k: &[u16]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let (q16, k16) = (q.chunks_exact(16), k.chunks_exact(16));
        let tail: f32 = q16
            .remainder()
            .iter()
            .zip(k16.remainder())
            .map(|(&a, &b)| a * crate::f16::f16_to_f32(b))
            .sum();
        for (qc, kc) in q.chunks_exact(16).zip(k.chunks_exact(16)) {
            for (half, a) in acc.iter_mut().enumerate() {
                // SAFETY: `qc` is 16 f32 and `kc` 16 u16 (chunks_exact); each half reads 8 of
                // each, in bounds.
                unsafe {
                    let kv = _mm256_cvtph_ps(_mm_loadu_si128(kc.as_ptr().add(8 * half).cast()));
                    let qv = _mm256_loadu_ps(qc.as_ptr().add(8 * half));
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
        }
        let sum = _mm256_add_ps(acc[0], acc[1]);
        let quad = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair))) + tail
    }
    // The one check per call (a cached lookup): the safe signature rests on it.
    if !Isa::Avx2.is_available() {
        return None;
    }
    // SAFETY: AVX2, FMA and F16C were detected just above.
    Some(unsafe { inner(q, k) })
}

/// `acc[i] += p · v[i]`, `v` in f16 bits, eight at a time with FMA.
pub(crate) fn axpy_f16(acc: &mut [f32], p: f32, v: &[u16]) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner(acc: &mut [f32], p: f32, v: &[u16]) {
        let pv = _mm256_set1_ps(p);
        let (a8, v8) = (acc.chunks_exact_mut(8), v.chunks_exact(8));
        let v_tail = v8.remainder();
        for (a, &b) in a8.into_remainder().iter_mut().zip(v_tail) {
            *a += p * crate::f16::f16_to_f32(b);
        }
        for (a, vc) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
            // SAFETY: `a` is 8 f32 and `vc` 8 u16 (chunks_exact): the loads and the store
            // touch only them.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(vc.as_ptr().cast()));
                let r = _mm256_fmadd_ps(pv, x, _mm256_loadu_ps(a.as_ptr()));
                _mm256_storeu_ps(a.as_mut_ptr(), r);
            }
        }
    }
    // The one check per call (a cached lookup): the safe signature rests on it.
    if !Isa::Avx2.is_available() {
        return false;
    }
    // SAFETY: AVX2, FMA and F16C were detected just above.
    unsafe { inner(acc, p, v) };
    true
}

/// Run-time detection, done once by `Isa::detect` and cached there.
pub(crate) fn has(isa: Isa) -> bool {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    match isa {
        Isa::Scalar => true,
        Isa::Avx2 => avx2,
        Isa::Avx512Vnni256 | Isa::Avx512Vnni512 => {
            avx2 && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::f16::{f16_to_f32, f32_to_f16};

    /// The AVX2 quantizer equals the scalar reference on random blocks, all-zero blocks, ties
    /// and blocks with a single large value.
    #[test]
    fn avx2_quantizer_matches_scalar() {
        if !Isa::Avx2.is_available() {
            return;
        }
        let mut rng = crate::tests::Rng::new(9);
        let mut blocks: Vec<[f32; QK]> = vec![[0.0; QK], std::array::from_fn(|i| i as f32 - 14.5)];
        let mut ties = [0.0f32; QK];
        ties[0] = 127.0;
        for (i, t) in ties.iter_mut().enumerate().skip(1) {
            *t = i as f32 - 16.5;
        }
        blocks.push(ties);
        for n in 0..5000 {
            let scale = [1e-6f32, 1e-2, 1.0, 37.0, 1e4][n % 5];
            let mut b: [f32; QK] = std::array::from_fn(|_| rng.f() * scale);
            if n % 7 == 0 {
                b[n % QK] = 1e3 * scale;
            }
            blocks.push(b);
        }
        for b in &blocks {
            assert_eq!(
                quantize_block(b),
                crate::blocks::quantize_block_scalar(b),
                "{b:?}"
            );
        }
    }

    #[target_feature(enable = "f16c")]
    fn hw_f16_to_f32(h: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16)))
    }

    #[target_feature(enable = "f16c")]
    fn hw_f32_to_f16(x: f32) -> u16 {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set1_ps(x))) as u16
    }

    /// The hand-written f16 conversions agree with F16C on every f16 and on a sweep of f32
    /// bit patterns (every 4099th, plus each f16 value's neighbours and midpoints).
    #[test]
    fn f16_conversion_matches_f16c() {
        if !is_x86_feature_detected!("f16c") {
            return;
        }
        for h in 0..=u16::MAX {
            // SAFETY: F16C was detected above.
            let hw = unsafe { hw_f16_to_f32(h) };
            let sw = f16_to_f32(h);
            assert!(
                hw.to_bits() == sw.to_bits() || (hw.is_nan() && sw.is_nan()),
                "{h:#06x}"
            );
        }
        let check = |bits: u32| {
            let x = f32::from_bits(bits);
            // SAFETY: F16C was detected above.
            let hw = unsafe { hw_f32_to_f16(x) };
            let sw = f32_to_f16(x);
            if x.is_nan() {
                assert!(hw & 0x7c00 == 0x7c00 && sw & 0x7c00 == 0x7c00 && sw & 0x3ff != 0);
            } else {
                assert_eq!(hw, sw, "{x:e} ({bits:#010x})");
            }
        };
        for bits in (0..=u32::MAX).step_by(4099) {
            check(bits);
        }
        for h in 0..0x7c00u32 {
            let b = f16_to_f32(h as u16).to_bits();
            for d in [0u32, 1, 0x0fff, 0x1000, 0x1001] {
                check(b.wrapping_add(d));
                check((b | 0x8000_0000).wrapping_add(d));
            }
        }
    }
}
