//! The file header: 2-byte big-endian format version, then the 16-byte random file ID.

use super::FORMAT_VERSION;

pub const HEADER_LEN: usize = 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub file_id: [u8; 16],
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file header truncated ({0} bytes)")]
    Truncated(usize),
    #[error("unsupported file header version {0}")]
    UnsupportedVersion(u16),
    #[error("file ID is all zeros")]
    ZeroId,
}

impl FileHeader {
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut file_id = [0u8; 16];
        getrandom::getrandom(&mut file_id)?;
        Ok(FileHeader { file_id })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..2].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[2..].copy_from_slice(&self.file_id);
        b
    }

    /// Strict parse: exactly version 1; an all-zero header (a hole where a header should be) is
    /// refused.
    pub fn parse(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Truncated(b.len()));
        }
        let v = u16::from_be_bytes([b[0], b[1]]);
        if v != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(v));
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[2..HEADER_LEN]);
        if file_id == [0u8; 16] {
            return Err(HeaderError::ZeroId);
        }
        Ok(FileHeader { file_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let h = FileHeader::random().unwrap();
        let b = h.encode();
        assert_eq!(&b[..2], &[0, 1]);
        assert_eq!(FileHeader::parse(&b), Ok(h));
    }

    #[test]
    fn refuses_bad() {
        assert_eq!(
            FileHeader::parse(&[0, 1, 2]),
            Err(HeaderError::Truncated(3))
        );
        let mut b = FileHeader::random().unwrap().encode();
        b[1] = 2;
        assert_eq!(
            FileHeader::parse(&b),
            Err(HeaderError::UnsupportedVersion(2))
        );
        assert_eq!(
            FileHeader::parse(&[0u8; 18]),
            Err(HeaderError::UnsupportedVersion(0))
        );
        let mut z = [0u8; 18];
        z[1] = 1;
        assert_eq!(FileHeader::parse(&z), Err(HeaderError::ZeroId));
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = FileHeader::parse(&b);
        }
    }
}
