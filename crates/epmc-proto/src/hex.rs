//! Hexadecimal text of fixed-size binary values (digests, fingerprints, token parts, keys),
//! shared by the agent and the server so that every such value is written one way.

/// Which letter case a decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// `a`–`f` only: the canonical form, for values compared as text (token parts, serials).
    Lower,
    /// Either case: for values an operator may paste from another tool (digests, keys).
    Any,
}

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn nibble(c: u8, case: Case) -> Option<u8> {
    match (c, case) {
        (b'0'..=b'9', _) => Some(c - b'0'),
        (b'a'..=b'f', _) => Some(c - b'a' + 10),
        (b'A'..=b'F', Case::Any) => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex of any even length; `None` for an odd length or any other character.
pub fn decode(s: &str, case: Case) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|pair| Some((nibble(pair[0], case)? << 4) | nibble(pair[1], case)?))
        .collect()
}

/// Decodes exactly `N` bytes (`2 * N` digits); `None` otherwise.
pub fn decode_array<const N: usize>(s: &str, case: Case) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (nibble(pair[0], case)? << 4) | nibble(pair[1], case)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn case_rules() {
        assert_eq!(decode("0aFf", Case::Any), Some(vec![0x0a, 0xff]));
        assert_eq!(decode("0aFf", Case::Lower), None);
        assert_eq!(decode("abc", Case::Any), None);
        assert_eq!(decode("", Case::Lower), Some(vec![]));
        assert_eq!(decode_array::<2>("0aff", Case::Lower), Some([0x0a, 0xff]));
        assert_eq!(decode_array::<2>("0aff00", Case::Lower), None);
        assert_eq!(decode_array::<2>("0ag0", Case::Any), None);
    }

    proptest! {
        #[test]
        fn round_trip(bytes: Vec<u8>) {
            let text = encode(&bytes);
            prop_assert_eq!(decode(&text, Case::Lower), Some(bytes.clone()));
            prop_assert_eq!(decode(&text.to_uppercase(), Case::Any), Some(bytes));
        }
    }
}
