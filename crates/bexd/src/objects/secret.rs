//! `secret` objects: a password or key that other options name by id instead
//! of carrying it (`driver=rbd`'s `key-secret`), given inline (`data=`) or in a
//! file (`file=`), as text (`format=raw`, the default) or base64.
//!
//! The bytes are kept decoded; a user that wants base64 (librados's `key`)
//! gets the bytes encoded again, so `format=raw,data=KEY` hands librados the
//! base64 of KEY's text, exactly as QEMU does (and fails the same way).

use qmp::schema::object::QCryptoSecretFormat;
use qmp::QmpError;

/// The secret's bytes; never printed.
pub struct Secret {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.bytes.len())
    }
}

impl Secret {
    /// A secret from its properties, with QEMU's errors.
    pub fn create(
        data: Option<String>,
        file: Option<String>,
        format: Option<QCryptoSecretFormat>,
        keyid: Option<String>,
        iv: Option<String>,
    ) -> Result<Self, QmpError> {
        if keyid.is_some() || iv.is_some() {
            return Err(QmpError::generic(
                "Parameter 'keyid': secrets encrypted with another secret are not supported by bexd",
            ));
        }
        let text = match (data, file) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'file' and 'data' are mutually exclusive",
                ))
            }
            (None, None) => {
                return Err(QmpError::generic(
                    "Either 'file' or 'data' must be provided",
                ))
            }
            (Some(d), None) => d.into_bytes(),
            (None, Some(path)) => std::fs::read(&path).map_err(|e| {
                QmpError::generic(format!(
                    "Unable to read {path}: Failed to open file \u{201c}{path}\u{201d}: {}",
                    crate::util::strerror(&e)
                ))
            })?,
        };
        let bytes = match format.unwrap_or(QCryptoSecretFormat::Raw) {
            QCryptoSecretFormat::Raw => text,
            QCryptoSecretFormat::Base64 => decode_base64(&text)
                .ok_or_else(|| QmpError::generic("Base64 data contains invalid characters"))?,
        };
        Ok(Self { bytes })
    }

    /// The bytes as base64 (what librados takes as `key`).
    pub fn as_base64(&self) -> String {
        encode_base64(&self.bytes)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            match i <= chunk.len() {
                true => out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char),
                false => out.push('='),
            }
        }
    }
    out
}

/// Standard base64 with padding, surrounding whitespace ignored (a key file
/// ends with a newline); `None` for anything else.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let text = text.trim_ascii();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for (i, quad) in text.chunks(4).enumerate() {
        let last = i == text.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            n = n << 6 | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_padding() {
        for text in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let encoded = encode_base64(text.as_bytes());
            assert_eq!(decode_base64(encoded.as_bytes()).unwrap(), text.as_bytes());
        }
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
        assert_eq!(decode_base64(b"Zm8=\n").unwrap(), b"fo");
    }

    #[test]
    fn bad_base64_is_refused() {
        for bad in ["%%%%", "Zm8", "Zm==Zm8=", "Z==="] {
            assert!(decode_base64(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn raw_secrets_are_encoded_and_base64_ones_kept() {
        let raw = Secret::create(Some("key".into()), None, None, None, None).unwrap();
        assert_eq!(raw.as_base64(), "a2V5");
        let b64 = Secret::create(
            Some("a2V5".into()),
            None,
            Some(QCryptoSecretFormat::Base64),
            None,
            None,
        )
        .unwrap();
        assert_eq!(b64.as_base64(), "a2V5");
    }

    #[test]
    fn data_and_file_are_one_or_the_other() {
        let e = Secret::create(None, None, None, None, None).unwrap_err();
        assert_eq!(e.desc, "Either 'file' or 'data' must be provided");
        let e = Secret::create(Some("a".into()), Some("/x".into()), None, None, None).unwrap_err();
        assert_eq!(e.desc, "'file' and 'data' are mutually exclusive");
    }
}
