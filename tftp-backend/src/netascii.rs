//! netascii (RFC 764 via RFC 1350): LF travels as CR LF and a bare CR as CR NUL.

/// Converts local text to netascii.
#[must_use]
pub fn encode(local: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(local.len() + local.len() / 16);
    for &b in local {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// Streaming netascii -> local conversion; a CR at the end of one block pairs with the first
/// byte of the next.
#[derive(Debug, Default)]
pub struct Decoder {
    pending_cr: bool,
}

impl Decoder {
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                match b {
                    b'\n' => out.push(b'\n'),
                    b'\0' => out.push(b'\r'),
                    b'\r' => {
                        out.push(b'\r');
                        self.pending_cr = true;
                    }
                    other => out.extend_from_slice(&[b'\r', other]),
                }
            } else if b == b'\r' {
                self.pending_cr = true;
            } else {
                out.push(b);
            }
        }
    }

    /// Flushes a CR left at the very end.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fixtures() {
        assert_eq!(encode(b"a\nb\rc"), b"a\r\nb\r\0c");
    }

    proptest! {
        #[test]
        fn decode_inverts_encode_across_any_split(text in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..300) {
            let wire = encode(&text);
            let split = split.min(wire.len());
            let mut decoder = Decoder::default();
            let mut out = Vec::new();
            decoder.decode(&wire[..split], &mut out);
            decoder.decode(&wire[split..], &mut out);
            decoder.finish(&mut out);
            prop_assert_eq!(out, text);
        }
    }
}
