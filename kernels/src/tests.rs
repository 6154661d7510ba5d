//! Cross-path tests: every available kernel against the scalar reference (bit for bit) on
//! random data and odd shapes, the repack round trip, and the reference against an f64
//! dequantize-then-dot within the quantization error.

use super::*;

/// splitmix64: deterministic, dependency-free test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random GGUF bytes for `n_out` rows of `k`: realistic scales, some zero scales, random
/// quants (all 16 / 256 values occur, including Q8_0's -128).
pub(crate) fn random_gguf(format: WeightFormat, n_out: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut out = vec![0u8; n_out * (k / QK) * bb];
    for blk in out.chunks_exact_mut(bb) {
        let d = if rng.next_u64().is_multiple_of(64) {
            0.0
        } else {
            0.002 + 0.02 * rng.f().abs()
        };
        blk[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        let mut at = 2;
        if format == WeightFormat::Q4_1 {
            blk[2..4].copy_from_slice(&f32_to_f16(-0.15 * rng.f().abs()).to_le_bytes());
            at = 4;
        }
        for b in &mut blk[at..] {
            *b = rng.next_u64() as u8;
        }
    }
    out
}

/// Random activations: mostly moderate, some outliers, some all-zero blocks.
pub(crate) fn random_acts(rows: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    let mut x: Vec<f32> = (0..rows * k)
        .map(|_| {
            let v = rng.f() * 2.0;
            if rng.next_u64().is_multiple_of(97) {
                v * 40.0
            } else {
                v
            }
        })
        .collect();
    if x.len() >= 64 {
        x[32..64].fill(0.0);
    }
    x
}

const FORMATS: [WeightFormat; 3] = [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0];

fn run(isa: Isa, w: &PackedMatrix, acts: &QuantizedActs) -> Vec<f32> {
    let mut out = vec![f32::NAN; acts.rows() * w.n_out()];
    let mut rows: Vec<&mut [f32]> = out.chunks_mut(w.n_out()).collect();
    matmul_rows_with(isa, w, acts, 0..w.n_out(), &mut rows).unwrap();
    out
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}: element {i}: {x} != {y}"
        );
    }
}

#[test]
fn repack_round_trips() {
    let mut rng = Rng::new(1);
    for format in FORMATS {
        for (n_out, k) in [
            (1, 32),
            (15, 64),
            (16, 32),
            (17, 96),
            (33, 576),
            (960, 576),
            (7, 1536),
        ] {
            let g = random_gguf(format, n_out, k, &mut rng);
            let w = PackedMatrix::pack(format, &g, n_out, k).unwrap();
            assert_eq!(w.unpack(), g, "{format:?} {n_out}x{k}");
            assert_eq!(w.tiles(), n_out.div_ceil(16));
            assert_eq!(w.gguf_bytes(), g.len());
        }
    }
}

#[test]
fn every_path_matches_the_reference_bit_for_bit() {
    let mut rng = Rng::new(2);
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_available()).collect();
    eprintln!("testing {isas:?}");
    for format in FORMATS {
        for (n_out, k) in [(1, 32), (33, 64), (48, 96), (17, 576), (100, 160)] {
            let g = random_gguf(format, n_out, k, &mut rng);
            let w = PackedMatrix::pack(format, &g, n_out, k).unwrap();
            for rows in [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17] {
                let x = random_acts(rows, k, &mut rng);
                let acts = QuantizedActs::quantize(format.act_format(), &x, k).unwrap();
                let want = reference_matmul(format, &g, n_out, &acts);
                for &isa in &isas {
                    let got = run(isa, &w, &acts);
                    assert_bits_eq(
                        &got,
                        &want,
                        &format!("{isa:?} {format:?} {n_out}x{k} rows={rows}"),
                    );
                }
            }
        }
    }
}

#[test]
fn model_shapes_match_the_reference() {
    let mut rng = Rng::new(3);
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_available()).collect();
    let shapes = [
        (WeightFormat::Q4_1, 960, 576, 7),
        (WeightFormat::Q4_1, 3072, 576, 1),
        (WeightFormat::Q4_1, 576, 1536, 64),
        (WeightFormat::Q8_0, 49152, 576, 1),
        (WeightFormat::Q4_0, 576, 1536, 3),
    ];
    for (format, n_out, k, rows) in shapes {
        let g = random_gguf(format, n_out, k, &mut rng);
        let w = PackedMatrix::pack(format, &g, n_out, k).unwrap();
        let x = random_acts(rows, k, &mut rng);
        let acts = QuantizedActs::quantize(format.act_format(), &x, k).unwrap();
        let want = reference_matmul(format, &g, n_out, &acts);
        for &isa in &isas {
            assert_bits_eq(
                &run(isa, &w, &acts),
                &want,
                &format!("{isa:?} {format:?} {n_out}x{k} rows={rows}"),
            );
        }
    }
}

#[test]
fn split_ranges_compose_to_the_whole() {
    let mut rng = Rng::new(4);
    let (format, n_out, k, rows) = (WeightFormat::Q4_1, 200, 64, 5);
    let g = random_gguf(format, n_out, k, &mut rng);
    let w = PackedMatrix::pack(format, &g, n_out, k).unwrap();
    let x = random_acts(rows, k, &mut rng);
    let mut acts = QuantizedActs::default();
    let mut whole = vec![0.0; rows * n_out];
    matmul(&w, &x, &mut acts, &mut whole).unwrap();
    for parts in [1, 2, 3, 5, 13, 40] {
        let ranges = split_rows(&w, parts);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert_eq!(ranges.last().unwrap().end, n_out);
        let mut out = vec![f32::NAN; rows * n_out];
        let mut panels = split_output(&mut out, n_out, &ranges);
        std::thread::scope(|s| {
            for (r, p) in ranges.iter().zip(panels.iter_mut()) {
                let (w, acts) = (&w, &acts);
                s.spawn(move || matmul_rows(w, acts, r.clone(), p).unwrap());
            }
        });
        assert_bits_eq(&out, &whole, &format!("{parts} parts"));
    }
}

/// The reference against the exact product of the dequantized weights and the f32
/// activations, in f64. The kernel's result differs from that by (a) the activation
/// rounding, Σ|w_c|·|x_c − dy·a_c| with dy the stored f16 scale; (b) for Q4_1 the min term,
/// |m|·|s − dy·Σa| (llama.cpp's s is f16(d·Σa) with the unrounded d); (c) f32 rounding of
/// about nb + 2 operations per output, bounded here by 1e-5 of Σ|terms|. The test also
/// checks the error is small in practice (rms error under 2% of the rms output on data with
/// outliers that inflate block scales).
#[test]
fn reference_is_within_quantization_error_of_f64() {
    let mut rng = Rng::new(5);
    for format in FORMATS {
        let (n_out, k, rows) = (40, 576, 3);
        let g = random_gguf(format, n_out, k, &mut rng);
        let x = random_acts(rows, k, &mut rng);
        let acts = QuantizedActs::quantize(format.act_format(), &x, k).unwrap();
        let got = reference_matmul(format, &g, n_out, &acts);
        let (nb, bb) = (k / QK, format.block_bytes());
        let (mut err2, mut exact2) = (0.0f64, 0.0f64);
        for j in 0..rows {
            for r in 0..n_out {
                let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                for b in 0..nb {
                    let blk = &g[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                    let wv: [f32; 32] = match format {
                        WeightFormat::Q4_0 => {
                            BlockQ4_0::from_bytes(blk.try_into().unwrap()).dequantize()
                        }
                        WeightFormat::Q4_1 => {
                            BlockQ4_1::from_bytes(blk.try_into().unwrap()).dequantize()
                        }
                        WeightFormat::Q8_0 => {
                            BlockQ8_0::from_bytes(blk.try_into().unwrap()).dequantize()
                        }
                    };
                    let a = acts.block_q8_1(j, b);
                    let dy = f64::from(f16_to_f32(a.d));
                    let mut suma = 0.0f64;
                    for c in 0..QK {
                        // Exact f64 weight: dx * q (+ m), independent of f32 rounding.
                        let w = f64::from(wv[c]);
                        let xc = f64::from(x[(j * nb + b) * QK + c]);
                        let aq = f64::from(a.qs[c]);
                        exact += w * xc;
                        bound += w.abs() * (xc - dy * aq).abs();
                        mag += (w * dy * aq).abs();
                        suma += aq;
                    }
                    if format == WeightFormat::Q4_1 {
                        let m = f64::from(f16_to_f32(u16::from_le_bytes([blk[2], blk[3]])));
                        bound += m.abs() * (f64::from(f16_to_f32(a.s)) - dy * suma).abs();
                    }
                }
                let v = f64::from(got[j * n_out + r]);
                let err = (v - exact).abs();
                assert!(
                    err <= bound + 1e-5 * mag + 1e-30,
                    "{format:?} j={j} r={r}: {v} vs {exact} (err {err}, bound {bound})"
                );
                err2 += err * err;
                exact2 += exact * exact;
            }
        }
        let rel = (err2 / exact2).sqrt();
        eprintln!("{format:?}: rms error / rms value = {rel:.2e}");
        assert!(rel < 0.02, "{format:?}: rms relative error {rel}");
    }
}

#[test]
fn shapes_are_checked() {
    let mut rng = Rng::new(6);
    let g = random_gguf(WeightFormat::Q4_1, 33, 64, &mut rng);
    assert_eq!(
        PackedMatrix::pack(WeightFormat::Q4_1, &g[..g.len() - 1], 33, 64).unwrap_err(),
        KernelError::WeightBytes {
            format: WeightFormat::Q4_1,
            n_out: 33,
            k: 64,
            expected: g.len(),
            got: g.len() - 1
        }
    );
    assert_eq!(
        PackedMatrix::pack(WeightFormat::Q8_0, &[], 1, 48).unwrap_err(),
        KernelError::RowLength { k: 48 }
    );
    let w = PackedMatrix::pack(WeightFormat::Q4_1, &g, 33, 64).unwrap();
    let x = random_acts(2, 64, &mut rng);
    let acts = QuantizedActs::quantize(ActFormat::Q8_1, &x, 64).unwrap();
    let mut o = [0.0; 2 * 17];
    let mut rows: Vec<&mut [f32]> = o.chunks_mut(17).collect();
    assert!(matches!(
        matmul_rows(&w, &acts, 8..25, &mut rows),
        Err(KernelError::RowRange { .. })
    ));
    matmul_rows(&w, &acts, 16..33, &mut rows).unwrap();
    let mut rows: Vec<&mut [f32]> = o.chunks_mut(16).take(2).collect();
    assert!(matches!(
        matmul_rows(&w, &acts, 16..33, &mut rows),
        Err(KernelError::OutputShape { .. })
    ));
    let wrong = QuantizedActs::quantize(ActFormat::Q8_0, &x, 64).unwrap();
    let mut o2 = vec![0.0; 2 * 33];
    let mut rows: Vec<&mut [f32]> = o2.chunks_mut(33).collect();
    assert!(matches!(
        matmul_rows(&w, &wrong, 0..33, &mut rows),
        Err(KernelError::ActivationShape { .. })
    ));
    let many =
        QuantizedActs::quantize(ActFormat::Q8_1, &random_acts(65, 64, &mut rng), 64).unwrap();
    let mut o3 = vec![0.0; 65 * 33];
    let mut rows: Vec<&mut [f32]> = o3.chunks_mut(33).collect();
    assert_eq!(
        matmul_rows(&w, &many, 0..33, &mut rows),
        Err(KernelError::TooManyRows { rows: 65 })
    );
}
