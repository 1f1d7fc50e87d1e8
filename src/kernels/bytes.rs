//! Floats to and from their little-endian bytes: the encoding of tensor bodies on the wire and of
//! expert units on disk. On a little-endian machine each direction is one `memcpy`, and a decode
//! writes into the new vector's uninitialised capacity (a zero fill first would touch every byte a
//! second time: it was 8% of the machine's CPU on a storage bench that moves 2 GiB per step).

/// Little-endian bytes (a multiple of 4; a trailing partial float is ignored) as a new vector of
/// f32s.
pub fn floats_from_le(raw: &[u8]) -> Vec<f32> {
    let n = raw.len() / 4;
    if cfg!(target_endian = "little") {
        let mut out = Vec::<f32>::with_capacity(n);
        // SAFETY: `out` has capacity for `n` f32s = `4 n` bytes, `raw` has at least `4 n` bytes,
        // the two do not overlap (`out` is new), and every bit pattern is a valid f32, so after
        // the copy the first `n` elements are initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), out.as_mut_ptr().cast::<u8>(), 4 * n);
            out.set_len(n);
        }
        out
    } else {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// Write `floats` as little-endian bytes into `out`, which holds exactly `4 * floats.len()` bytes.
///
/// # Panics
/// When `out` has another length (a caller's sizing error, never input).
pub fn put_floats_le(out: &mut [u8], floats: &[f32]) {
    assert_eq!(out.len(), 4 * floats.len(), "put_floats_le: output of the wrong size");
    if cfg!(target_endian = "little") {
        out.copy_from_slice(bytemuck::cast_slice(floats));
    } else {
        for (d, x) in out.chunks_exact_mut(4).zip(floats) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Append `floats` to `out` as little-endian bytes.
pub fn extend_floats_le(out: &mut Vec<u8>, floats: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(floats));
    } else {
        for x in floats {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Floats whose memory was filled with little-endian bytes (read straight from a socket or a file
/// into the vector) made native: nothing to do on a little-endian machine.
pub fn floats_from_le_in_place(floats: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for x in floats {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_bitwise_from_any_byte_offset() {
        // Signed zeros, a subnormal, infinities, NaNs with payloads, then arbitrary bit patterns.
        let xs: Vec<f32> = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE / 2.0, f32::INFINITY, f32::MAX]
            .into_iter()
            .chain([f32::from_bits(0x7fc0_1234), f32::from_bits(0xffa0_0001)])
            .chain((0..1000u32).map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B9))))
            .collect();
        let mut raw = vec![0u8; 4 + 4 * xs.len()];
        for offset in 0..4 {
            put_floats_le(&mut raw[offset..offset + 4 * xs.len()], &xs);
            let back = floats_from_le(&raw[offset..offset + 4 * xs.len()]);
            assert_eq!(back.len(), xs.len());
            assert!(back.iter().zip(&xs).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let mut appended = vec![0xAA];
        extend_floats_le(&mut appended, &xs);
        assert_eq!(
            &appended[1..],
            &raw[3..3 + 4 * xs.len()],
            "appending writes the same bytes"
        );
        // The bytes as they would land in a vector's memory, then made native.
        let mut in_place: Vec<f32> = appended[1..]
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        floats_from_le_in_place(&mut in_place);
        assert!(in_place.iter().zip(&xs).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(floats_from_le(&[1, 2, 3]).is_empty());
        assert_eq!(floats_from_le(&raw[..9]).len(), 2);
    }
}
