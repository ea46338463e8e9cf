//! The `compression` header: bodies compressed by kombu before publishing.
//!
//! kombu registers zlib under the MIME type `application/x-gzip` (aliases
//! `gzip`, `zlib`) even though the bytes are a *zlib* stream (`x\x9c...`), and
//! puts the MIME type in the header. We also accept a real gzip stream under
//! the same names, sniffing the magic bytes, since other producers may take
//! the name literally. bz2, brotli, lzma and zstd would need crates this
//! worker does not carry, so they are refused with an error naming them.
//!
//! Output is capped at [`MAX_DECOMPRESSED`]: a small hostile body can expand
//! a thousandfold, and that must be an error, not an out-of-memory kill.

use std::io::Read;

/// Largest decompressed body accepted (64 MiB).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

/// Why a body could not be decompressed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompressionError {
    /// A compression kombu knows but this worker does not implement, or an unknown name.
    #[error("unsupported compression '{0}'")]
    Unsupported(String),
    /// The data is not a valid stream of the named kind.
    #[error("corrupt {kind} data: {reason}")]
    Corrupt {
        /// `zlib` or `gzip`.
        kind: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// Decompressing would exceed [`MAX_DECOMPRESSED`].
    #[error("decompressed body exceeds {limit} bytes")]
    TooLarge {
        /// The cap that was hit.
        limit: usize,
    },
}

/// Decompresses `data` as named by the `compression` header (a MIME type or a
/// kombu alias), capped at [`MAX_DECOMPRESSED`].
pub fn decompress(mime_or_name: &str, data: &[u8]) -> Result<Vec<u8>, CompressionError> {
    decompress_capped(mime_or_name, data, MAX_DECOMPRESSED)
}

/// [`decompress`] with an explicit output cap.
pub fn decompress_capped(
    mime_or_name: &str,
    data: &[u8],
    limit: usize,
) -> Result<Vec<u8>, CompressionError> {
    let name = mime_or_name.trim().to_ascii_lowercase();
    match name.as_str() {
        "application/x-gzip" | "application/gzip" | "gzip" | "zlib" | "application/zlib"
        | "application/x-zlib" => {
            if data.starts_with(&[0x1f, 0x8b]) {
                read_capped(flate2::read::GzDecoder::new(data), "gzip", limit)
            } else {
                read_capped(flate2::read::ZlibDecoder::new(data), "zlib", limit)
            }
        }
        _ => Err(CompressionError::Unsupported(mime_or_name.to_owned())),
    }
}

fn read_capped(
    r: impl Read,
    kind: &'static str,
    limit: usize,
) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::new();
    // Read one byte past the cap so "exactly the cap" and "more" differ.
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    r.take(cap)
        .read_to_end(&mut out)
        .map_err(|e| CompressionError::Corrupt {
            kind,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(CompressionError::TooLarge { limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("write");
        e.finish().expect("finish")
    }

    #[test]
    fn kombu_x_gzip_is_zlib() {
        let z = zlib(b"hello");
        assert_eq!(&z[..2], b"x\x9c");
        assert_eq!(
            decompress("application/x-gzip", &z).as_deref(),
            Ok(&b"hello"[..])
        );
        assert_eq!(decompress("zlib", &z).as_deref(), Ok(&b"hello"[..]));
    }

    #[test]
    fn real_gzip_is_accepted() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"hi").expect("write");
        let g = e.finish().expect("finish");
        assert_eq!(decompress("gzip", &g).as_deref(), Ok(&b"hi"[..]));
    }

    #[test]
    fn bz2_is_refused_by_name() {
        let err = decompress("application/x-bz2", b"BZh9").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported compression 'application/x-bz2'"
        );
    }

    #[test]
    fn bomb_hits_the_cap() {
        let z = zlib(&vec![0u8; 1 << 20]);
        assert_eq!(
            decompress_capped("zlib", &z, 1000),
            Err(CompressionError::TooLarge { limit: 1000 })
        );
        assert_eq!(
            decompress_capped("zlib", &z, 1 << 20).map(|v| v.len()),
            Ok(1 << 20)
        );
    }

    #[test]
    fn garbage_is_corrupt() {
        assert!(matches!(
            decompress("application/x-gzip", b"not zlib at all"),
            Err(CompressionError::Corrupt { .. })
        ));
    }
}
