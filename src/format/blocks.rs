//! Pure block arithmetic: plaintext offsets ↔ on-disk offsets. A backing file is empty (a new or
//! truncated-to-zero file has no header) or a header followed by blocks, each
//! `BLOCK_SIZE + overhead` bytes on disk except possibly the last, which is shorter.

use super::{BLOCK_SIZE, HEADER_LEN};

const BS: u64 = BLOCK_SIZE as u64;

/// The block layout of one cipher suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    overhead: u64,
}

/// A backing file whose length no valid ciphertext can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("backing file shorter than its header ({0} bytes)")]
    TruncatedHeader(u64),
    #[error("last block truncated: {0} bytes on disk cannot hold any data")]
    TruncatedBlock(u64),
}

impl Layout {
    pub const fn new(overhead: usize) -> Self {
        Layout {
            overhead: overhead as u64,
        }
    }

    /// Bytes per full block on disk.
    pub fn disk_block(&self) -> u64 {
        BS + self.overhead
    }

    pub fn overhead(&self) -> usize {
        self.overhead as usize
    }

    /// Plaintext size of a backing file of `len` bytes.
    pub fn plain_size(&self, len: u64) -> Result<u64, SizeError> {
        if len == 0 {
            return Ok(0);
        }
        let h = HEADER_LEN as u64;
        if len < h {
            return Err(SizeError::TruncatedHeader(len));
        }
        let body = len - h;
        let full = body / self.disk_block();
        let rem = body % self.disk_block();
        if rem == 0 {
            return Ok(full * BS);
        }
        if rem <= self.overhead {
            return Err(SizeError::TruncatedBlock(rem));
        }
        Ok(full * BS + rem - self.overhead)
    }

    /// Plaintext size for stat, which must not fail. A damaged tail of `rem` bytes counts as
    /// `rem` bytes of data, so that reading to the end reaches it and gets EIO instead of a
    /// silently shorter file.
    pub fn plain_size_lossy(&self, len: u64) -> u64 {
        match self.plain_size(len) {
            Ok(s) => s,
            Err(SizeError::TruncatedHeader(_)) => 0,
            Err(SizeError::TruncatedBlock(rem)) => {
                let body = len - HEADER_LEN as u64 - rem;
                body / self.disk_block() * BS + rem
            }
        }
    }

    /// Backing file length holding `size` plaintext bytes.
    pub fn backing_size(&self, size: u64) -> u64 {
        if size == 0 {
            return 0;
        }
        let full = size / BS;
        let rem = size % BS;
        let tail = if rem == 0 { 0 } else { rem + self.overhead };
        HEADER_LEN as u64 + full * self.disk_block() + tail
    }

    /// On-disk offset of block `index`.
    pub fn block_offset(&self, index: u64) -> u64 {
        HEADER_LEN as u64 + index * self.disk_block()
    }

    /// Plaintext length of block `index` in a file of `size` bytes (0 past the end).
    pub fn block_len(&self, index: u64, size: u64) -> usize {
        let start = index * BS;
        if start >= size {
            0
        } else {
            (size - start).min(BS) as usize
        }
    }
}

/// Index of the block holding plaintext offset `off`.
pub fn block_of(off: u64) -> u64 {
    off / BS
}

/// Offset within its block.
pub fn offset_in_block(off: u64) -> usize {
    (off % BS) as usize
}

/// The blocks `[first, last]` touched by `len > 0` bytes at `off`.
pub fn block_range(off: u64, len: u64) -> (u64, u64) {
    (block_of(off), block_of(off + len - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GCM: Layout = Layout::new(28);
    const XTS: Layout = Layout::new(0);

    #[test]
    fn worked_sizes() {
        // The worked examples of docs/FORMAT.md.
        assert_eq!(GCM.backing_size(0), 0);
        assert_eq!(GCM.backing_size(1), 18 + 1 + 28);
        assert_eq!(GCM.backing_size(4096), 18 + 4124);
        assert_eq!(GCM.backing_size(4097), 18 + 4124 + 29);
        assert_eq!(GCM.backing_size(1 << 20), 18 + 256 * 4124);
        assert_eq!(XTS.backing_size(10), 28);
        assert_eq!(XTS.backing_size(1 << 20), 18 + (1 << 20));
    }

    #[test]
    fn damaged_lengths() {
        assert_eq!(GCM.plain_size(5), Err(SizeError::TruncatedHeader(5)));
        assert_eq!(GCM.plain_size(18), Ok(0));
        assert_eq!(GCM.plain_size(18 + 28), Err(SizeError::TruncatedBlock(28)));
        assert_eq!(
            GCM.plain_size(18 + 4124 + 3),
            Err(SizeError::TruncatedBlock(3))
        );
        assert_eq!(GCM.plain_size_lossy(18 + 4124 + 3), 4096 + 3);
        assert_eq!(XTS.plain_size(19), Ok(1));
    }

    #[test]
    fn ranges() {
        assert_eq!(block_range(0, 1), (0, 0));
        assert_eq!(block_range(4095, 2), (0, 1));
        assert_eq!(block_range(4096, 4096), (1, 1));
        assert_eq!(offset_in_block(4097), 1);
        assert_eq!(GCM.block_len(1, 5000), 5000 - 4096);
        assert_eq!(GCM.block_len(2, 5000), 0);
        assert_eq!(GCM.block_offset(2), 18 + 2 * 4124);
    }

    proptest! {
        #[test]
        fn size_round_trip(size in 0u64..(1u64 << 45), oh in prop::sample::select(vec![0usize, 28])) {
            let l = Layout::new(oh);
            prop_assert_eq!(l.plain_size(l.backing_size(size)), Ok(size));
        }

        #[test]
        fn range_covers(off in 0u64..(1u64 << 40), len in 1u64..(1u64 << 24)) {
            let (a, b) = block_range(off, len);
            prop_assert!(a * BS <= off);
            prop_assert!((b + 1) * BS >= off + len);
            prop_assert!(b * BS < off + len);
        }
    }
}
