//! Join tokens: `SHOAL1-<CA fingerprint, 64 hex>-<secret, 32 hex>`.
//!
//! The fingerprint lets a joining node check that it talks to the right cluster before it sends
//! anything; the secret lets the cluster check the node before it signs its certificate. The
//! cluster keeps only a hash of the secret, so `shoal token rotate` invalidates old tokens.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "SHOAL1";

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: [u8; 32],
    pub secret: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "a join token looks like SHOAL1-<64 hex digits>-<32 hex digits>; get one with `shoal token show` on a cluster node"
    )]
    Malformed,
}

impl JoinToken {
    pub fn new(ca_fingerprint: [u8; 32]) -> JoinToken {
        JoinToken {
            ca_fingerprint,
            secret: rand::random(),
        }
    }

    /// What the cluster stores to check a token: a hash of its secret.
    pub fn secret_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.secret).as_bytes()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}-{}-{}",
            hex::encode(self.ca_fingerprint),
            hex::encode(self.secret)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken({}-…)",
            &hex::encode(self.ca_fingerprint)[..12]
        )
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<JoinToken, TokenError> {
        let mut parts = s.trim().split('-');
        let (Some(PREFIX), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let mut t = JoinToken {
            ca_fingerprint: [0; 32],
            secret: [0; 16],
        };
        hex::decode_to_slice(fp, &mut t.ca_fingerprint).map_err(|_| TokenError::Malformed)?;
        hex::decode_to_slice(secret, &mut t.secret).map_err(|_| TokenError::Malformed)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = JoinToken::new([7; 32]);
        let s = t.to_string();
        assert!(s.starts_with("SHOAL1-0707"));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        for bad in [
            "",
            "SHOAL1",
            "SHOAL2-00-00",
            &s[..s.len() - 1],
            &format!("{s}-x"),
            &s.replace("SHOAL1", "shoal1"),
        ] {
            assert_eq!(
                bad.parse::<JoinToken>(),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        assert_ne!(JoinToken::new([7; 32]).secret, t.secret);
    }
}
