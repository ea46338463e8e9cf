//! The `compression` header: bodies compressed by kombu before publishing.
//!
//! kombu registers zlib under the MIME type `application/x-gzip` (aliases
//! `gzip`, `zlib`) even though the bytes are a *zlib* stream (`x\x9c...`), and
//! puts the MIME type in the header. We also accept a real gzip stream under
//! the same names, sniffing the magic bytes, since other producers may take
//! the name literally.
//!
//! kombu also registers bz2 (`application/x-bz2`, aliases `bzip2`, `bzip`) and
//! lzma (`application/x-lzma`, aliases `lzma`, `xz`), both from the Python
//! standard library, so every Python worker decodes them; they are decoded
//! here as Python's `bz2.decompress` / `lzma.decompress` do: concatenated
//! streams are joined, and `lzma` takes the `.xz` container (what
//! `lzma.compress` writes) or a legacy `.lzma` stream (`FORMAT_AUTO`).
//! brotli and zstd are registered only when their optional Python packages are
//! installed (omega|ml's worker image has neither), so they are refused with
//! an error naming them, as that worker refuses them.
//!
//! Output is capped at [`MAX_DECOMPRESSED`]: a small hostile body can expand
//! a thousandfold, and that must be an error, not an out-of-memory kill.

use std::io::Read;

/// Largest decompressed body accepted (64 MiB).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

/// Memory an lzma dictionary may take (KiB): 128 MiB covers every preset
/// (`-9` uses a 64 MiB dictionary) while a forged header asking for gigabytes
/// is refused before anything is allocated.
const LZMA_MEMLIMIT_KIB: u32 = 128 * 1024;

/// Why a body could not be decompressed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompressionError {
    /// A compression kombu knows but this worker does not implement, or an unknown name.
    #[error("unsupported compression '{0}'")]
    Unsupported(String),
    /// The data is not a valid stream of the named kind.
    #[error("corrupt {kind} data: {reason}")]
    Corrupt {
        /// `zlib`, `gzip`, `bzip2`, `xz` or `lzma`.
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
        "application/x-bz2" | "bzip2" | "bzip" => {
            read_capped(bzip2::read::MultiBzDecoder::new(data), "bzip2", limit)
        }
        "application/x-lzma" | "lzma" | "xz" => decompress_lzma(data, limit),
        _ => Err(CompressionError::Unsupported(mime_or_name.to_owned())),
    }
}

/// Python's `lzma.decompress(data)` (`FORMAT_AUTO`): the `.xz` container when
/// the data starts with its magic bytes, else a legacy `.lzma` stream.
fn decompress_lzma(data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
    if data.starts_with(XZ_MAGIC) {
        // Concatenated .xz streams (and stream padding) decode as one, as in Python.
        let r = lzma_rust2::XzReader::new_mem_limit(data, true, LZMA_MEMLIMIT_KIB);
        read_capped(r, "xz", limit)
    } else {
        let r =
            lzma_rust2::LzmaReader::new_mem_limit(data, LZMA_MEMLIMIT_KIB, None).map_err(|e| {
                CompressionError::Corrupt {
                    kind: "lzma",
                    reason: e.to_string(),
                }
            })?;
        read_capped(r, "lzma", limit)
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
    fn brotli_and_zstd_are_refused_by_name() {
        // Registered by kombu only with optional packages omega|ml's worker lacks.
        let err = decompress("application/x-brotli", b"\x0b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported compression 'application/x-brotli'"
        );
        assert!(matches!(
            decompress("zstd", b"\x28\xb5\x2f\xfd"),
            Err(CompressionError::Unsupported(_))
        ));
    }

    #[test]
    fn bz2_and_xz_bombs_hit_the_cap() {
        let zeros = vec![0u8; 1 << 20];
        let mut bz = Vec::new();
        bzip2::read::BzEncoder::new(&zeros[..], bzip2::Compression::default())
            .read_to_end(&mut bz)
            .expect("bz2");
        assert_eq!(
            decompress_capped("bzip2", &bz, 1000),
            Err(CompressionError::TooLarge { limit: 1000 })
        );
        assert_eq!(
            decompress_capped("bzip2", &bz, 1 << 20).map(|v| v.len()),
            Ok(1 << 20)
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
