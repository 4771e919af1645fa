//! Internet checksum arithmetic (RFC 1071, RFC 1624), shared by the kernel programs and tests.
//!
//! The kernel rewrites addresses, ports and lengths and inserts or removes the steering header;
//! instead of summing the whole payload again it updates the existing UDP checksum with the
//! difference (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).

/// Sum of the big-endian 16-bit words of `bytes` (an odd trailing byte is padded with zero),
/// not folded. Fixed-size so the kernel's loop has a constant bound.
#[inline(always)]
#[must_use]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if N % 2 == 1 {
        sum += u32::from(bytes[N - 1]) << 8;
    }
    sum
}

/// Folds a 32-bit sum of words into 16 bits with end-around carry.
#[inline(always)]
#[must_use]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded twice: fits in 16 bits")]
    let folded = sum as u16;
    folded
}

/// Updates checksum `check` for data whose words summed to `removed` before and sum to `added`
/// now. Both sums may span many words; they are folded first.
#[inline(always)]
#[must_use]
pub fn update(check: u16, removed: u32, added: u32) -> u16 {
    let sum = u32::from(!check) + u32::from(!fold(removed)) + u32::from(fold(added));
    !fold(sum)
}

/// A UDP checksum of 0 means "no checksum" (IPv4); a computed 0 is sent as 0xffff. An absent
/// checksum stays absent.
#[inline(always)]
#[must_use]
pub fn update_udp(check: u16, removed: u32, added: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match update(check, removed, added) {
        0 => 0xffff,
        other => other,
    }
}

/// Checksum of a complete header (its checksum field must be zero when summed).
#[inline(always)]
#[must_use]
pub fn complete(sum: u32) -> u16 {
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::{complete, fold, sum_words, update, update_udp};

    /// Reference: checksum of arbitrary bytes, computed from scratch.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        complete(sum)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to 0x2ddf0 -> ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_words(&data), 0x2_ddf0);
        assert_eq!(fold(sum_words(&data)), 0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum_words(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        // A buffer whose first 8 bytes change and whose words 8.. stay.
        let mut data = [0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(i * 37 % 251).unwrap();
        }
        let before = reference(&data);
        let old: [u8; 8] = data[..8].try_into().unwrap();
        let new = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x45, 0xff, 0xff];
        data[..8].copy_from_slice(&new);
        assert_eq!(update(before, sum_words(&old), sum_words(&new)), reference(&data));
    }

    #[test]
    fn removing_a_block_matches_recomputation() {
        let data: Vec<u8> = (0..200u32).map(|i| u8::try_from(i * 13 % 256).unwrap()).collect();
        let removed: [u8; 64] = data[20..84].try_into().unwrap();
        let mut rest: Vec<u8> = data[..20].to_vec();
        rest.extend_from_slice(&data[84..]);
        assert_eq!(update(reference(&data), sum_words(&removed), 0), reference(&rest));
    }

    #[test]
    fn udp_zero_means_absent() {
        assert_eq!(update_udp(0, 0x1234, 0x4321), 0);
        assert_ne!(update_udp(0x1234, 0x1111, 0x2222), 0);
    }
}
