//! The cluster's wire format: fixed binary frames, decoded field by field, every length checked
//! against limits before anything is allocated. No generic serialisation, nothing a worker could
//! interpret beyond numbers: sequence ids, positions, counts and f32 activations.
//!
//! A frame is an 8-byte header (`kind: u8`, three zero bytes, `len: u32` little-endian) and
//! `len` bytes of payload. docs/cluster.md describes every kind, byte by byte.

use std::io::{Read, Write};

use anyhow::{Context, Result, bail, ensure};

/// Version of this protocol; both sides must speak the same one.
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 8;
/// Largest frame accepted before the handshake has agreed on limits (a Hello is
/// [`HELLO_LEN`] bytes).
pub const HANDSHAKE_MAX_FRAME: usize = 1024;
/// Bytes of an encoded [`Hello`]: version 2, model digest 32, layers 4 + 4, last 1, dtype 1,
/// four u32 dimensions and limits 16.
pub const HELLO_LEN: usize = 60;
/// Ceiling on any frame whatever the handshake agrees: bounds one allocation (256 MiB).
pub const MAX_FRAME_CEILING: usize = 256 << 20;
/// Longest refusal or failure reason carried (they are logged, never interpreted).
pub const MAX_REASON_BYTES: usize = 512;
/// Sequence ids freed in one Free frame.
pub const MAX_FREE_IDS: usize = 4096;

/// The only activation type on the wire today: the compute dtype of the CPU path.
pub const DTYPE_F32: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    HelloOk = 0x02,
    Refuse = 0x03,
    Step = 0x10,
    Hidden = 0x11,
    Logits = 0x12,
    StepFailed = 0x13,
    Free = 0x20,
    Ping = 0x30,
    Pong = 0x31,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            0x01 => Self::Hello,
            0x02 => Self::HelloOk,
            0x03 => Self::Refuse,
            0x10 => Self::Step,
            0x11 => Self::Hidden,
            0x12 => Self::Logits,
            0x13 => Self::StepFailed,
            0x20 => Self::Free,
            0x30 => Self::Ping,
            0x31 => Self::Pong,
            other => bail!("unknown frame kind {other:#04x}"),
        })
    }
}

/// A frame as read from the wire: its kind and its payload, not yet decoded.
#[derive(Debug)]
pub struct RawFrame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Read one frame; a payload longer than `max_len` is refused before it is allocated.
pub fn read_frame(r: &mut impl Read, max_len: usize) -> Result<RawFrame> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)
        .context("reading a frame header")?;
    let kind = Kind::from_u8(header[0])?;
    ensure!(
        header[1..4] == [0, 0, 0],
        "reserved header bytes are not zero"
    );
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    ensure!(
        len <= max_len.min(MAX_FRAME_CEILING),
        "frame of {len} bytes exceeds the agreed maximum of {} bytes",
        max_len.min(MAX_FRAME_CEILING)
    );
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .with_context(|| format!("reading a {kind:?} frame of {len} bytes"))?;
    Ok(RawFrame { kind, payload })
}

/// Write one frame (header and payload) and flush it.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<()> {
    ensure!(
        payload.len() <= MAX_FRAME_CEILING,
        "frame too large to send"
    );
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind as u8;
    header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Field-by-field reader over a payload: every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(n <= self.buf.len(), "frame payload is truncated");
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let bytes = self.take(n.checked_mul(4).context("length overflow")?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn finish(self) -> Result<()> {
        ensure!(
            self.buf.is_empty(),
            "frame payload has {} trailing bytes",
            self.buf.len()
        );
        Ok(())
    }
}

fn put_f32s(out: &mut Vec<u8>, data: &[f32]) {
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The handshake: each side states what it is; the other refuses any mismatch by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub model_sha256: [u8; 32],
    /// The stage's layers, `[start, end)`.
    pub layers: (u32, u32),
    /// Whether the stage is the last one (it returns logits, not hidden states).
    pub last: bool,
    pub dtype: u8,
    pub hidden: u32,
    pub vocab: u32,
    /// Most rows (tokens) in one step.
    pub max_rows: u32,
    /// Most sequences in one step.
    pub max_items: u32,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_LEN);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.model_sha256);
        out.extend_from_slice(&self.layers.0.to_le_bytes());
        out.extend_from_slice(&self.layers.1.to_le_bytes());
        out.push(u8::from(self.last));
        out.push(self.dtype);
        for v in [self.hidden, self.vocab, self.max_rows, self.max_items] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(payload: &[u8]) -> Result<Self> {
        let mut c = Cursor { buf: payload };
        let h = Self {
            version: c.u16()?,
            model_sha256: c.take(32)?.try_into()?,
            layers: (c.u32()?, c.u32()?),
            last: match c.u8()? {
                0 => false,
                1 => true,
                b => bail!("Hello.last is {b}, not 0 or 1"),
            },
            dtype: c.u8()?,
            hidden: c.u32()?,
            vocab: c.u32()?,
            max_rows: c.u32()?,
            max_items: c.u32()?,
        };
        c.finish()?;
        Ok(h)
    }

    /// Why `peer` cannot be this node's partner, naming the first field that differs.
    pub fn mismatch(&self, peer: &Hello) -> Option<String> {
        let field = if self.version != peer.version {
            "protocol version"
        } else if self.model_sha256 != peer.model_sha256 {
            "model SHA-256 (model.sha256, or the digest of model.files)"
        } else if self.layers != peer.layers {
            "layer range (cluster.layers)"
        } else if self.last != peer.last {
            "last-stage flag (the stages' layers do not end at the model's last layer)"
        } else if self.dtype != peer.dtype {
            "activation dtype"
        } else if self.hidden != peer.hidden || self.vocab != peer.vocab {
            "model dimensions"
        } else if self.max_rows != peer.max_rows || self.max_items != peer.max_items {
            "step limits (engine.max_batch_tokens, engine.max_batch)"
        } else {
            return None;
        };
        Some(format!(
            "{field} differs: this node has {}, the peer {}",
            self.describe(field),
            peer.describe(field)
        ))
    }

    fn describe(&self, field: &str) -> String {
        match field {
            f if f.starts_with("protocol") => self.version.to_string(),
            f if f.starts_with("model SHA") => hex::encode(self.model_sha256),
            f if f.starts_with("layer") => format!("[{}, {})", self.layers.0, self.layers.1),
            f if f.starts_with("last") => self.last.to_string(),
            f if f.starts_with("activation") => self.dtype.to_string(),
            f if f.starts_with("model dim") => {
                format!("hidden {} vocab {}", self.hidden, self.vocab)
            }
            _ => format!("{} rows, {} sequences", self.max_rows, self.max_items),
        }
    }

    /// The largest frame either side may send once this handshake is agreed.
    pub fn max_frame(&self) -> usize {
        let (rows, items) = (self.max_rows as usize, self.max_items as usize);
        let step = 16 + 16 * items + 4 * rows * self.hidden as usize;
        let logits = 12 + 4 * items * self.vocab as usize;
        let free = 4 + 8 * MAX_FREE_IDS;
        step.max(logits).max(free).max(HANDSHAKE_MAX_FRAME)
    }
}

/// One sequence's part of a step: its id, the position of its first new row, its row count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMeta {
    pub seq: u64,
    pub position: u32,
    pub rows: u32,
}

/// A step for a stage: the sequences' metadata and their packed hidden states.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub step: u64,
    pub items: Vec<StepMeta>,
    /// `rows × hidden` activations, row-major.
    pub hidden: Vec<f32>,
}

impl Step {
    pub fn rows(&self) -> usize {
        self.items.iter().map(|m| m.rows as usize).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 16 * self.items.len() + 4 * self.hidden.len());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.rows() as u32).to_le_bytes());
        for m in &self.items {
            out.extend_from_slice(&m.seq.to_le_bytes());
            out.extend_from_slice(&m.position.to_le_bytes());
            out.extend_from_slice(&m.rows.to_le_bytes());
        }
        put_f32s(&mut out, &self.hidden);
        out
    }

    /// Decode and check against the agreed limits: item and row counts, rows adding up, and
    /// exactly `rows × hidden` activations.
    pub fn decode(payload: &[u8], agreed: &Hello) -> Result<Self> {
        let mut c = Cursor { buf: payload };
        let step = c.u64()?;
        let n_items = c.u32()? as usize;
        let rows = c.u32()? as usize;
        ensure!(
            (1..=agreed.max_items as usize).contains(&n_items),
            "step with {n_items} sequences; the agreed maximum is {}",
            agreed.max_items
        );
        ensure!(
            (1..=agreed.max_rows as usize).contains(&rows),
            "step with {rows} rows; the agreed maximum is {}",
            agreed.max_rows
        );
        let mut items = Vec::with_capacity(n_items);
        for _ in 0..n_items {
            items.push(StepMeta {
                seq: c.u64()?,
                position: c.u32()?,
                rows: c.u32()?,
            });
        }
        ensure!(
            items.iter().all(|m| m.rows > 0)
                && items.iter().map(|m| m.rows as usize).sum::<usize>() == rows,
            "the sequences' row counts do not add up to the step's {rows} rows"
        );
        let hidden = c.f32s(rows * agreed.hidden as usize)?;
        c.finish()?;
        Ok(Self {
            step,
            items,
            hidden,
        })
    }
}

/// A stage's answer to a step: hidden states for the next stage, or the last stage's logits
/// (one row per sequence, its last row's).
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub step: u64,
    pub rows: u32,
    pub data: Vec<f32>,
}

impl StepOutput {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 4 * self.data.len());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        put_f32s(&mut out, &self.data);
        out
    }

    /// Decode an answer expected to hold `rows` rows of `width` values for step `step`.
    pub fn decode(payload: &[u8], step: u64, rows: usize, width: usize) -> Result<Self> {
        let mut c = Cursor { buf: payload };
        let got_step = c.u64()?;
        ensure!(
            got_step == step,
            "answer for step {got_step} while waiting for step {step}"
        );
        let got_rows = c.u32()? as usize;
        ensure!(
            got_rows == rows,
            "answer with {got_rows} rows, {rows} expected"
        );
        let data = c.f32s(rows * width)?;
        c.finish()?;
        Ok(Self {
            step,
            rows: rows as u32,
            data,
        })
    }
}

/// A text reason (Refuse, StepFailed): bounded, UTF-8, only ever logged.
pub fn encode_reason(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

pub fn decode_reason(payload: &[u8]) -> String {
    let end = payload.len().min(MAX_REASON_BYTES);
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// Free the caches of these sequences.
pub fn encode_free(seqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * seqs.len());
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for s in seqs {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

pub fn decode_free(payload: &[u8]) -> Result<Vec<u64>> {
    let mut c = Cursor { buf: payload };
    let n = c.u32()? as usize;
    ensure!(
        n <= MAX_FREE_IDS,
        "Free with {n} sequences; at most {MAX_FREE_IDS}"
    );
    let seqs = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
    c.finish()?;
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            model_sha256: [7; 32],
            layers: (15, 30),
            last: true,
            dtype: DTYPE_F32,
            hidden: 4,
            vocab: 10,
            max_rows: 8,
            max_items: 3,
        }
    }

    #[test]
    fn hello_round_trips_and_names_mismatches() {
        let h = hello();
        assert_eq!(h.encode().len(), HELLO_LEN);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut other = h.clone();
        other.model_sha256 = [8; 32];
        assert!(h.mismatch(&other).unwrap().contains("model.sha256"));
        let mut other = h.clone();
        other.layers = (14, 30);
        assert!(h.mismatch(&other).unwrap().contains("cluster.layers"));
        assert!(h.mismatch(&h).is_none());
        // Trailing or missing bytes are refused.
        let mut long = h.encode();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        assert!(Hello::decode(&h.encode()[..10]).is_err());
    }

    #[test]
    fn step_round_trips_within_limits() {
        let s = Step {
            step: 9,
            items: vec![
                StepMeta {
                    seq: 1,
                    position: 0,
                    rows: 2,
                },
                StepMeta {
                    seq: 5,
                    position: 7,
                    rows: 1,
                },
            ],
            hidden: (0..12).map(|i| i as f32 * 0.5).collect(),
        };
        assert_eq!(Step::decode(&s.encode(), &hello()).unwrap(), s);
    }

    #[test]
    fn step_over_the_agreed_limits_is_refused() {
        let meta = |rows| StepMeta {
            seq: 1,
            position: 0,
            rows,
        };
        let too_many_rows = Step {
            step: 1,
            items: vec![meta(9)],
            hidden: vec![0.0; 36],
        };
        let err = Step::decode(&too_many_rows.encode(), &hello()).unwrap_err();
        assert!(err.to_string().contains("agreed maximum"), "{err}");
        let too_many_items = Step {
            step: 1,
            items: vec![meta(1); 4],
            hidden: vec![0.0; 16],
        };
        assert!(Step::decode(&too_many_items.encode(), &hello()).is_err());
        // Rows that do not add up, and activations of the wrong length.
        let mut bad = Step {
            step: 1,
            items: vec![meta(2)],
            hidden: vec![0.0; 8],
        }
        .encode();
        bad[12] = 3; // the step's row count
        assert!(Step::decode(&bad, &hello()).is_err());
        let short = Step {
            step: 1,
            items: vec![meta(2)],
            hidden: vec![0.0; 7],
        };
        assert!(Step::decode(&short.encode(), &hello()).is_err());
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Step, &[0u8; 100]).unwrap();
        let err = read_frame(&mut wire.as_slice(), 99).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        // A header announcing 4 GiB with no payload behind it fails on the limit, not on an
        // allocation or a read.
        let header = [0x10u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        let err = read_frame(&mut header.as_slice(), MAX_FRAME_CEILING).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        assert_eq!(
            read_frame(&mut wire.as_slice(), 100).unwrap().payload.len(),
            100
        );
    }

    #[test]
    fn unknown_kind_and_reserved_bytes_are_refused() {
        let err = read_frame(&mut [0x7fu8, 0, 0, 0, 0, 0, 0, 0].as_slice(), 10).unwrap_err();
        assert!(err.to_string().contains("unknown frame kind"), "{err}");
        let err = read_frame(&mut [0x30u8, 1, 0, 0, 0, 0, 0, 0].as_slice(), 10).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn outputs_and_frees_check_their_lengths() {
        let o = StepOutput {
            step: 3,
            rows: 2,
            data: vec![1.0; 8],
        };
        assert_eq!(StepOutput::decode(&o.encode(), 3, 2, 4).unwrap(), o);
        assert!(StepOutput::decode(&o.encode(), 4, 2, 4).is_err());
        assert!(StepOutput::decode(&o.encode(), 3, 2, 5).is_err());
        assert_eq!(
            decode_free(&encode_free(&[1, 2, 3])).unwrap(),
            vec![1, 2, 3]
        );
        let mut huge = encode_free(&[]);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_free(&huge).is_err());
        assert_eq!(decode_reason(&encode_reason(&"é".repeat(600))).len(), 512);
    }
}
