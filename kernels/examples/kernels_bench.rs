//! Kernel benchmark: this machine's read bandwidth (the ceiling) and, per kernel path, GB/s
//! of weights streamed and GMAC/s at the model's shapes. `bench/kernels.sh` runs it and the
//! callgrind instruction counts.
//!
//! `kernels_bench` prints the tables (`--only PATH [ROWS]` limits them to one path); `kernels_bench --calls N ISA FORMAT NOUTxK ROWS` only
//! packs one matrix and calls the kernel N times (for `valgrind --tool=callgrind`: the count
//! of the N = 11 run minus the N = 1 run, over 10, is the instructions of one call).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use kernels::{Isa, PackedMatrix, QuantizedActs, WeightFormat, matmul_rows_with, split_rows};

/// Weights streamed per measurement: well past the 32 MiB L3, so every call reads DRAM.
const STREAM_BYTES: usize = 256 << 20;
/// Bandwidth buffer: 512 MiB.
const BW_BYTES: usize = 512 << 20;
/// Each figure is the best of this many timed batches (the machine is shared and noisy).
const BATCHES: usize = 5;
const BATCH_TIME: Duration = Duration::from_millis(60);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn gguf(format: WeightFormat, n_out: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut v = vec![0u8; n_out * k / 32 * bb];
    for blk in v.chunks_exact_mut(bb) {
        blk[..2].copy_from_slice(&kernels::f32_to_f16(0.01 + 0.01 * rng.f()).to_le_bytes());
        let at = if format == WeightFormat::Q4_1 { 4 } else { 2 };
        if at == 4 {
            blk[2..4].copy_from_slice(&kernels::f32_to_f16(-0.1).to_le_bytes());
        }
        for b in &mut blk[at..] {
            *b = rng.next() as u8;
        }
    }
    v
}

/// Sum of a buffer as u64 lanes; eight accumulators so the loop vectorises.
fn sum(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in buf.chunks_exact(8) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// Read bandwidth in GB/s with `threads` threads each summing its share of a large buffer.
fn bandwidth(buf: &[u64], threads: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..BATCHES {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(buf.len().div_ceil(threads)) {
                s.spawn(move || black_box(sum(part)));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best / 1e9
}

/// Seconds per call: best batch average over `mats` used round-robin.
fn time_calls(isa: Isa, mats: &[PackedMatrix], acts: &QuantizedActs, threads: usize) -> f64 {
    let n_out = mats[0].n_out();
    let rows = acts.rows();
    let mut outs: Vec<Vec<f32>> = (0..threads).map(|_| vec![0.0; rows * n_out]).collect();
    let ranges = split_rows(&mats[0], threads);
    // Calibrate the iteration count on one pass.
    let t = Instant::now();
    let mut calls = 0;
    while t.elapsed() < BATCH_TIME / 4 || calls < mats.len().min(8) {
        one(isa, &mats[calls % mats.len()], acts, 0..n_out, &mut outs[0]);
        calls += 1;
    }
    let iters = ((calls as f64 * 4.0).ceil() as usize).max(3);
    let mut best = f64::MAX;
    for _ in 0..BATCHES {
        let secs = if threads == 1 {
            let t = Instant::now();
            for i in 0..iters {
                one(isa, &mats[i % mats.len()], acts, 0..n_out, &mut outs[0]);
            }
            t.elapsed().as_secs_f64()
        } else {
            // A persistent pair of workers with a barrier per call, as an engine pool would run.
            let barrier = Barrier::new(ranges.len());
            let t = Instant::now();
            std::thread::scope(|s| {
                for (r, out) in ranges.iter().zip(outs.iter_mut()) {
                    let barrier = &barrier;
                    s.spawn(move || {
                        for i in 0..iters {
                            barrier.wait();
                            one(isa, &mats[i % mats.len()], acts, r.clone(), out);
                        }
                    });
                }
            });
            t.elapsed().as_secs_f64()
        };
        best = best.min(secs / iters as f64);
    }
    best
}

fn one(
    isa: Isa,
    w: &PackedMatrix,
    acts: &QuantizedActs,
    r: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let len = r.len();
    let mut rows: Vec<&mut [f32]> = out.chunks_mut(len).take(acts.rows()).collect();
    matmul_rows_with(isa, w, acts, r, &mut rows).expect("kernel call");
}

fn parse_format(s: &str) -> WeightFormat {
    match s {
        "q4_0" => WeightFormat::Q4_0,
        "q4_1" => WeightFormat::Q4_1,
        "q8_0" => WeightFormat::Q8_0,
        _ => panic!("format: q4_0, q4_1 or q8_0"),
    }
}

fn parse_isa(s: &str) -> Isa {
    match s {
        "scalar" => Isa::Scalar,
        "avx2" => Isa::Avx2,
        "vnni256" => Isa::Avx512Vnni256,
        "vnni512" => Isa::Avx512Vnni512,
        _ => panic!("isa: scalar, avx2, vnni256 or vnni512"),
    }
}

fn name(isa: Isa) -> &'static str {
    match isa {
        Isa::Scalar => "scalar",
        Isa::Avx2 => "avx2",
        Isa::Avx512Vnni256 => "vnni256",
        Isa::Avx512Vnni512 => "vnni512",
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut rng = Rng(7);
    if args.get(1).map(String::as_str) == Some("--calls") {
        return repeat_calls(&args, &mut rng);
    }
    // `--only PATH [ROWS]`: time just one path (and one activation-row count) for quick checks.
    let only = (args.get(1).map(String::as_str) == Some("--only")).then(|| parse_isa(&args[2]));
    let only_rows: Option<usize> = only.and(args.get(3)).map(|r| r.parse().expect("rows"));
    let buf: Vec<u64> = (0..BW_BYTES / 8).map(|i| i as u64).collect();
    let bw = (bandwidth(&buf, 1), bandwidth(&buf, 2));
    drop(buf);
    println!(
        "read bandwidth (512 MiB buffer sum, best of {BATCHES}): 1 thread {:.1} GB/s, 2 threads {:.1} GB/s",
        bw.0, bw.1
    );
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_available()).collect();
    println!(
        "kernel paths available: {isas:?}; default {:?}",
        Isa::detect()
    );
    quantization_cost(&mut rng);
    println!();
    println!(
        "| weights | shape (out x in) | act rows | path | threads | us/call | GB/s | GMAC/s | % of bw | hot GB/s | hot GMAC/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let shapes = [
        (WeightFormat::Q4_1, 960, 576),
        (WeightFormat::Q4_1, 3072, 576),
        (WeightFormat::Q4_1, 576, 1536),
        (WeightFormat::Q8_0, 49152, 576),
        (WeightFormat::Q4_0, 3072, 576),
    ];
    for (format, n_out, k) in shapes {
        table_rows(format, n_out, k, &isas, (only, only_rows), bw, &mut rng);
    }
}

/// `--calls N PATH FORMAT NOUTxK ROWS`: one kernel call N times (for callgrind).
fn repeat_calls(args: &[String], rng: &mut Rng) {
    let calls: usize = args[2].parse().expect("calls");
    let isa = parse_isa(&args[3]);
    let format = parse_format(&args[4]);
    let (n, k) = args[5].split_once('x').expect("NOUTxK");
    let (n_out, k): (usize, usize) = (n.parse().unwrap(), k.parse().unwrap());
    let rows: usize = args[6].parse().expect("rows");
    let w = PackedMatrix::pack(format, &gguf(format, n_out, k, rng), n_out, k).unwrap();
    let x: Vec<f32> = (0..rows * k).map(|_| rng.f()).collect();
    let acts = QuantizedActs::quantize(format.act_format(), &x, k).unwrap();
    let mut out = vec![0.0; rows * n_out];
    if !isa.is_available() {
        eprintln!("{isa:?} not available here");
        std::process::exit(2);
    }
    for _ in 0..calls {
        one(isa, &w, &acts, 0..n_out, &mut out);
    }
    black_box(&out);
}

/// Activation quantization cost (done once per call, by one thread).
fn quantization_cost(rng: &mut Rng) {
    for k in [576usize, 1536] {
        let x: Vec<f32> = (0..64 * k).map(|_| rng.f()).collect();
        let mut acts = QuantizedActs::default();
        let t = Instant::now();
        let reps = 200;
        for _ in 0..reps {
            acts.quantize_into(kernels::ActFormat::Q8_1, black_box(&x), k)
                .unwrap();
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / (reps * 64) as f64;
        println!("quantize one activation row of {k} to Q8_1: {ns:.0} ns");
    }
}

/// The table's rows for one weight shape: every path, activation-row count and thread count,
/// streamed from DRAM and hot. `only` narrows to one path and row count; `bw` is the read
/// bandwidth with 1 and 2 threads.
fn table_rows(
    format: WeightFormat,
    n_out: usize,
    k: usize,
    isas: &[Isa],
    only: (Option<Isa>, Option<usize>),
    bw: (f64, f64),
    rng: &mut Rng,
) {
    let g = gguf(format, n_out, k, rng);
    let one_mat = PackedMatrix::pack(format, &g, n_out, k).unwrap();
    let copies = STREAM_BYTES.div_ceil(one_mat.packed_bytes()).max(2);
    let stream: Vec<PackedMatrix> = (0..copies)
        .map(|_| PackedMatrix::pack(format, &g, n_out, k).unwrap())
        .collect();
    let hot = [one_mat];
    let bytes = hot[0].packed_bytes() as f64;
    for rows in [1usize, 4, 16, 64] {
        let x: Vec<f32> = (0..rows * k).map(|_| rng.f()).collect();
        let acts = QuantizedActs::quantize(format.act_format(), &x, k).unwrap();
        let macs = (n_out * k * rows) as f64;
        for &isa in isas {
            if only.0.is_some_and(|o| o != isa) || only.1.is_some_and(|r| r != rows) {
                continue;
            }
            if isa == Isa::Scalar && (rows > 1 || n_out > 3072) {
                continue; // minutes per figure; the scalar path is a fallback
            }
            let threads_list: &[usize] = if isa == Isa::detect() { &[1, 2] } else { &[1] };
            for &threads in threads_list {
                let t = time_calls(isa, &stream, &acts, threads);
                let th = time_calls(isa, &hot, &acts, threads);
                let bw = if threads == 1 { bw.0 } else { bw.1 };
                println!(
                    "| {format:?} | {n_out}x{k} | {rows} | {} | {threads} | {:.1} | {:.1} | {:.1} | {:.0}% | {:.1} | {:.1} |",
                    name(isa),
                    t * 1e6,
                    bytes / t / 1e9,
                    macs / t / 1e9,
                    100.0 * bytes / t / 1e9 / bw,
                    bytes / th / 1e9,
                    macs / th / 1e9,
                );
            }
        }
    }
}
