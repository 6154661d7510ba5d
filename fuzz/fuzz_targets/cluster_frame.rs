//! The cluster's wire frames as a worker and a head read them from a peer: a stream of frames
//! read with the handshake limit, then with the agreed one, each payload decoded by its kind.
//! Whatever decodes must encode back to the same bytes (the format has one spelling).
//!
//! Input: 8 bytes that choose the node's own limits (the agreed Hello comes from this node's
//! configuration, never from the peer), then the bytes the peer sends.
#![no_main]

use bulwark::cluster::frame::{
    self, DTYPE_F32, HANDSHAKE_MAX_FRAME, Hello, Kind, MAX_REASON_BYTES, PROTOCOL_VERSION, Step,
    StepOutput,
};
use libfuzzer_sys::fuzz_target;

/// Frames read from one input: enough for a handshake and a few steps.
const MAX_FRAMES: usize = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (limits, mut wire) = data.split_at(8);
    // Small dimensions keep valid steps reachable; the decoders treat them as any others.
    let agreed = Hello {
        version: PROTOCOL_VERSION,
        model_sha256: [7; 32],
        layers: (0, 15),
        last: limits[0] & 1 == 1,
        dtype: DTYPE_F32,
        hidden: 1 + u32::from(limits[1] % 16),
        vocab: 1 + u32::from(limits[2] % 32),
        max_rows: 1 + u32::from(limits[3] % 16),
        max_items: 1 + u32::from(limits[4] % 8),
    };
    let expected_step = u64::from(limits[5] % 4);
    let expected_rows = 1 + usize::from(limits[6] % 8);
    let width = if agreed.last {
        agreed.vocab
    } else {
        agreed.hidden
    } as usize;

    let mut max = HANDSHAKE_MAX_FRAME;
    for _ in 0..MAX_FRAMES {
        let Ok(f) = frame::read_frame(&mut wire, max) else {
            return;
        };
        assert!(
            f.payload.len() <= max,
            "read_frame let an oversized frame through"
        );
        match f.kind {
            Kind::Hello | Kind::HelloOk => {
                if let Ok(h) = Hello::decode(&f.payload) {
                    assert_eq!(h.encode(), f.payload, "Hello does not round-trip");
                    let _ = agreed.mismatch(&h);
                    let _ = h.mismatch(&agreed);
                    max = agreed.max_frame();
                }
            }
            Kind::Step => {
                if let Ok(s) = Step::decode(&f.payload, &agreed) {
                    assert!(s.items.len() <= agreed.max_items as usize);
                    assert!(s.rows() <= agreed.max_rows as usize);
                    assert_eq!(s.hidden.len(), s.rows() * agreed.hidden as usize);
                    assert_eq!(s.encode(), f.payload, "Step does not round-trip");
                }
            }
            Kind::Hidden | Kind::Logits => {
                if let Ok(o) = StepOutput::decode(&f.payload, expected_step, expected_rows, width) {
                    assert_eq!(o.data.len(), expected_rows * width);
                    assert_eq!(o.encode(), f.payload, "StepOutput does not round-trip");
                }
            }
            Kind::Free => {
                if let Ok(seqs) = frame::decode_free(&f.payload) {
                    assert!(seqs.len() <= frame::MAX_FREE_IDS);
                    assert_eq!(frame::encode_free(&seqs), f.payload);
                }
            }
            Kind::Refuse | Kind::StepFailed => {
                let reason = frame::decode_reason(&f.payload);
                // At most MAX_REASON_BYTES input bytes, each at worst one U+FFFD (3 bytes).
                assert!(reason.len() <= 3 * MAX_REASON_BYTES);
                assert!(frame::encode_reason(&reason).len() <= MAX_REASON_BYTES);
            }
            Kind::Ping | Kind::Pong => {}
        }
    }
});
