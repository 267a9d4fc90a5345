//! Anti-replay for ESP (RFC 4303 §3.4.3) with 64-bit sequence numbers.
//!
//! The window is a ring of 64-bit blocks (the technique of RFC 6479): moving
//! the window forward clears whole blocks instead of shifting a bitmap, so an
//! update costs the same at 1 packet or 2000 packets per jump. One block is
//! kept free so a jump never clears bits still inside the window, leaving
//! [`WINDOW`] packets of usable window.
//!
//! [`ReplayWindow::check`] runs before decryption (cheap rejection);
//! [`ReplayWindow::accept`] runs only after the ICV verified, as RFC 4303
//! requires, so a forged packet cannot move the window.

/// Number of 64-bit blocks in the ring (a power of two).
const BLOCKS: u64 = 32;
const BLOCK_BITS: u64 = 64;
/// Packets the window covers: 1984 (RFC 4303 asks for at least 32, the
/// issue for at least 1024).
pub const WINDOW: u64 = (BLOCKS - 1) * BLOCK_BITS;

/// Why a sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("sequence number already received")]
    Duplicate,
    #[error("sequence number is older than the replay window")]
    TooOld,
    #[error("sequence number 0 is never sent")]
    Zero,
}

/// The receive window of one inbound SA.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest sequence number accepted so far (0: none yet).
    top: u64,
    ring: [u64; BLOCKS as usize],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self {
            top: 0,
            ring: [0; BLOCKS as usize],
        }
    }

    /// Highest sequence number accepted so far.
    pub fn top(&self) -> u64 {
        self.top
    }

    fn slot(seq: u64) -> (usize, u64) {
        let block = (seq / BLOCK_BITS) % BLOCKS;
        (block as usize, 1u64 << (seq % BLOCK_BITS))
    }

    /// Whether `seq` may be new. Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Zero);
        }
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = Self::slot(seq);
        if self.ring[block] & bit != 0 {
            return Err(ReplayError::Duplicate);
        }
        Ok(())
    }

    /// Records `seq` as received (call after the ICV verified).
    pub fn accept(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if seq > self.top {
            let current = self.top / BLOCK_BITS;
            let target = seq / BLOCK_BITS;
            let jump = (target - current).min(BLOCKS);
            for i in 1..=jump {
                self.ring[((current + i) % BLOCKS) as usize] = 0;
            }
            self.top = seq;
        }
        let (block, bit) = Self::slot(seq);
        self.ring[block] |= bit;
        Ok(())
    }
}

/// The full 64-bit sequence number of a received packet whose low 32 bits
/// are `low`, given the highest number accepted so far (`top`), per RFC 4303
/// Appendix A2.1. The result is a guess that the ICV confirms or refutes.
pub fn infer_esn(top: u64, low: u32) -> u64 {
    let top_low = top as u32;
    let top_high = (top >> 32) as u32;
    // The bottom of the window, as a 32-bit number.
    let window_bottom = top_low.wrapping_sub(WINDOW as u32 - 1);
    let high = if u64::from(top_low) >= WINDOW - 1 {
        // The window lies within one 2^32 subspace.
        if low >= window_bottom {
            top_high
        } else {
            top_high.wrapping_add(1)
        }
    } else if low >= window_bottom {
        // The window spans two subspaces and `low` is in the older one
        // (before subspace 0 nothing is valid: the ICV will refuse it).
        top_high.saturating_sub(1)
    } else {
        top_high
    };
    (u64::from(high) << 32) | u64::from(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_out_of_order_duplicates_and_too_old() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(0), Err(ReplayError::Zero));
        for seq in [1, 2, 3, 5, 4] {
            w.accept(seq).unwrap();
        }
        assert_eq!(w.accept(4), Err(ReplayError::Duplicate));
        assert_eq!(w.top(), 5);
        // Jump far ahead: everything at or below top - WINDOW is too old.
        let far = 5 + WINDOW + 10;
        w.accept(far).unwrap();
        assert_eq!(w.check(far - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.check(far - WINDOW + 1), Ok(()));
        assert_eq!(w.check(5), Err(ReplayError::TooOld));
        // A fresh number inside the window is accepted once.
        w.accept(far - 1).unwrap();
        assert_eq!(w.accept(far - 1), Err(ReplayError::Duplicate));
    }

    #[test]
    fn the_whole_window_is_usable_after_a_block_sized_jump() {
        let mut w = ReplayWindow::new();
        let top = 10 * WINDOW;
        w.accept(top).unwrap();
        // Every number in the window is new exactly once, whatever order.
        for seq in (top - WINDOW + 1..top).rev() {
            w.accept(seq).unwrap();
        }
        for seq in top - WINDOW + 1..=top {
            assert_eq!(w.check(seq), Err(ReplayError::Duplicate), "seq {seq}");
        }
        // Moving by one block keeps old bits of the window intact.
        w.accept(top + 64).unwrap();
        assert_eq!(w.check(top), Err(ReplayError::Duplicate));
        assert_eq!(w.check(top + 63), Ok(()));
    }

    #[test]
    fn check_does_not_move_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(100).unwrap();
        assert_eq!(w.check(1_000_000), Ok(()));
        assert_eq!(w.top(), 100);
        assert_eq!(w.check(99), Ok(()));
    }

    #[test]
    fn esn_inference_around_the_2_pow_32_boundary() {
        let boundary = 1u64 << 32;
        // Window inside one subspace, far from the edges.
        assert_eq!(infer_esn(5000, 4000), 4000);
        assert_eq!(infer_esn(5000, 6000), 6000);
        // Top just below 2^32: low numbers belong to the next subspace.
        let top = boundary - 10;
        assert_eq!(infer_esn(top, 5), boundary + 5);
        assert_eq!(infer_esn(top, u32::MAX - 20), boundary - 21);
        assert_eq!(infer_esn(top, u32::MAX), boundary - 1);
        // Top just above 2^32: the window spans both subspaces.
        let top = boundary + 10;
        assert_eq!(infer_esn(top, 3), boundary + 3);
        assert_eq!(infer_esn(top, 20), boundary + 20);
        assert_eq!(infer_esn(top, u32::MAX - 5), boundary - 6);
        // Deep into the second subspace, old low-numbered values from the
        // first one are read as the next wrap (and the ICV will refuse them).
        let top = boundary + 1_000_000;
        assert_eq!(infer_esn(top, 999_000), boundary + 999_000);
        assert_eq!(infer_esn(top, 10), 2 * boundary + 10);
        // Nothing received yet.
        assert_eq!(infer_esn(0, 1), 1);
        assert_eq!(infer_esn(0, u32::MAX), u64::from(u32::MAX));
    }

    #[test]
    fn esn_and_window_agree_across_the_boundary() {
        let mut w = ReplayWindow::new();
        let start = (1u64 << 32) - 300;
        for seq in start..start + 600 {
            let low = seq as u32;
            let full = infer_esn(w.top(), low);
            assert_eq!(full, seq, "inferred {full} for {seq}");
            w.accept(full).unwrap();
        }
    }
}
