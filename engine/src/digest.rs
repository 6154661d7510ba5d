//! A SHA-256 digest as a type: parsed once from the 64 hex digits of the configuration (or
//! computed from a file), compared as bytes, printed as lowercase hex.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(bytes).into())
    }

    pub fn parse(hex_digits: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(
                "must be 64 hex digits, the file's SHA-256 (run `bulwark model hash FILE`)",
            )
        })
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_in_either_case_and_prints_lowercase() {
        let lower = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        let a = Sha256::parse(lower).unwrap();
        assert_eq!(Sha256::parse(&lower.to_uppercase()), Some(a));
        assert_eq!(a.to_string(), lower);
        assert!(Sha256::parse("abc").is_none());
        assert!(Sha256::parse(&"g".repeat(64)).is_none());
    }
}
