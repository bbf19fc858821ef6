//! The data representations of MQTT (section 1.5): two- and four-byte integers,
//! variable byte integers, UTF-8 strings with the specification's rules, binary data
//! and string pairs; reading from a `Bytes` cursor and writing to a `BytesMut`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};

/// Largest value of a variable byte integer (and so of a remaining length).
pub const MAX_VARINT: u32 = 268_435_455;

fn need(buf: &Bytes, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::Malformed("packet shorter than its fields"))
    } else {
        Ok(())
    }
}

/// Read one byte.
pub fn read_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

/// Read a two-byte integer.
pub fn read_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    need(buf, 2)?;
    Ok(buf.get_u16())
}

/// Read a four-byte integer.
pub fn read_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    need(buf, 4)?;
    Ok(buf.get_u32())
}

/// Read a variable byte integer (at most four bytes).
pub fn read_varint(buf: &mut Bytes) -> Result<u32, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let byte = read_u8(buf)?;
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// Peek a variable byte integer at the start of `bytes`: `Ok(None)` if more bytes are
/// needed, else the value and how many bytes it took.
pub fn peek_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = bytes.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// Read binary data (two-byte length, then the bytes), without copying.
pub fn read_binary(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf)?);
    need(buf, len)?;
    Ok(buf.split_to(len))
}

/// Read a UTF-8 string: valid UTF-8 (so no surrogates), no U+0000 [MQTT-1.5.4].
pub fn read_string(buf: &mut Bytes) -> Result<String, DecodeError> {
    let raw = read_binary(buf)?;
    let s = std::str::from_utf8(&raw)
        .map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("string contains U+0000"));
    }
    Ok(s.to_owned())
}

/// Read a UTF-8 string pair.
pub fn read_pair(buf: &mut Bytes) -> Result<(String, String), DecodeError> {
    Ok((read_string(buf)?, read_string(buf)?))
}

/// Bytes a variable byte integer of `value` takes.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Write a variable byte integer.
pub fn write_varint(out: &mut BytesMut, mut value: usize) -> Result<(), EncodeError> {
    if value > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge);
    }
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return Ok(());
        }
    }
}

/// Write binary data with its two-byte length.
pub fn write_binary(out: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong(data.len()))?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}

/// Write a UTF-8 string with its two-byte length.
pub fn write_string(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    write_binary(out, s.as_bytes())
}

/// Bytes a string or binary field takes on the wire.
pub fn field_len(data_len: usize) -> usize {
    2 + data_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_1_5_5_varint_boundaries_round_trip() {
        for (value, bytes) in [
            (0usize, vec![0x00]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_151, vec![0xFF, 0xFF, 0x7F]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
            (268_435_455, vec![0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = BytesMut::new();
            write_varint(&mut out, value).unwrap();
            assert_eq!(&out[..], &bytes[..], "{value}");
            assert_eq!(varint_len(value), bytes.len());
            assert_eq!(
                read_varint(&mut Bytes::from(bytes.clone())).unwrap() as usize,
                value
            );
            assert_eq!(
                peek_varint(&bytes).unwrap(),
                Some((value as u32, bytes.len()))
            );
        }
        assert!(write_varint(&mut BytesMut::new(), 268_435_456).is_err());
    }

    #[test]
    fn mqtt_1_5_5_a_fifth_varint_byte_is_malformed() {
        let bytes = [0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        assert!(read_varint(&mut Bytes::copy_from_slice(&bytes)).is_err());
        assert!(peek_varint(&bytes).is_err());
        assert_eq!(
            peek_varint(&[0xFF, 0xFF]).unwrap(),
            None,
            "more bytes needed"
        );
    }

    #[test]
    fn mqtt_1_5_4_strings_must_be_valid_utf8_without_nul() {
        let ok = Bytes::from_static(&[0x00, 0x03, b'a', b'/', b'b']);
        assert_eq!(read_string(&mut ok.clone()).unwrap(), "a/b");
        // A UTF-16 surrogate (U+D800) encoded as UTF-8 is not valid UTF-8.
        let surrogate = Bytes::from_static(&[0x00, 0x03, 0xED, 0xA0, 0x80]);
        assert!(read_string(&mut surrogate.clone()).is_err());
        let nul = Bytes::from_static(&[0x00, 0x01, 0x00]);
        assert!(read_string(&mut nul.clone()).is_err());
        let short = Bytes::from_static(&[0x00, 0x05, b'a']);
        assert!(read_string(&mut short.clone()).is_err());
        let long = "x".repeat(65_536);
        assert_eq!(
            write_string(&mut BytesMut::new(), &long),
            Err(EncodeError::FieldTooLong(65_536))
        );
    }
}
