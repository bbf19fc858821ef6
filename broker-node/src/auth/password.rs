//! Mosquitto-compatible password files: one `username:hash` per line, the hash in
//! Mosquitto 2's `$7$` form (PBKDF2-HMAC-SHA512: `$7$<iterations>$<salt>$<hash>`,
//! base64) or the older `$6$` form (SHA-512 of password and salt:
//! `$6$<salt>$<hash>`). Files made by `mosquitto_passwd` work unchanged, and
//! `broker-node passwd` writes the same format.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha512};

/// Iterations of new `$7$` hashes (Mosquitto's default).
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;

/// A loaded password file.
#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
}

#[derive(Clone, Debug)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// Why a password file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// It could not be read.
    #[error("cannot read password file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A line is not `username:hash` with a known hash.
    #[error("password file {path}, line {line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl PasswordFile {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| PasswordFileError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|(line, reason)| PasswordFileError::Line {
            path: path.display().to_string(),
            line,
            reason,
        })
    }

    /// Parse the text of a password file; the error names the line.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (i + 1, "expected username:hash".to_owned()))?;
            let hash = parse_hash(hash).map_err(|e| (i + 1, e))?;
            users.insert(user.to_owned(), hash);
        }
        Ok(PasswordFile { users })
    }

    /// Whether `password` is `user`'s. Unknown users are checked against a dummy
    /// hash so that the answer takes as long either way.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.matches(password),
            None => {
                let dummy = Hash::Pbkdf2 {
                    iterations: ITERATIONS,
                    salt: vec![0; SALT_LEN],
                    hash: vec![0; 64],
                };
                let _ = dummy.matches(password);
                false
            }
        }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn parse_hash(text: &str) -> Result<Hash, String> {
    let b64 = |s: &str| {
        STANDARD
            .decode(s)
            .map_err(|e| format!("bad base64 in hash: {e}"))
    };
    let parts: Vec<&str> = text.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => Ok(Hash::Pbkdf2 {
            iterations: iterations
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("bad iteration count {iterations:?}"))?,
            salt: b64(salt)?,
            hash: b64(hash)?,
        }),
        ["", "6", salt, hash] => Ok(Hash::Sha512 {
            salt: b64(salt)?,
            hash: b64(hash)?,
        }),
        _ => Err("the hash is neither $7$ (PBKDF2-SHA512) nor $6$ (SHA-512); plain-text passwords are not accepted: hash the file with `broker-node passwd` or mosquitto_passwd -U".to_owned()),
    }
}

impl Hash {
    fn matches(&self, password: &[u8]) -> bool {
        let (computed, expected) = match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len().max(1)];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                (out, hash)
            }
            Hash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                (h.finalize().to_vec(), hash)
            }
        };
        computed.len() == expected.len()
            && computed
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// A `$7$` hash of `password` with a fresh random salt, as `mosquitto_passwd` writes.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), &salt, ITERATIONS, &mut out);
    format!(
        "$7${ITERATIONS}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// Set `user`'s password in the file at `path` (created if missing), keeping every
/// other line as it was.
pub fn set_password(path: &Path, user: &str, password: &str) -> std::io::Result<()> {
    if user.is_empty() || user.contains(':') {
        return Err(std::io::Error::other(
            "a username is not empty and has no ':'",
        ));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let entry = format!("{user}:{}", hash_password(password));
    let mut replaced = false;
    let mut lines: Vec<String> = existing
        .lines()
        .map(|l| {
            if l.split_once(':').is_some_and(|(u, _)| u == user) {
                replaced = true;
                entry.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !replaced {
        lines.push(entry);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_hash_verifies_and_a_wrong_password_does_not() {
        let file =
            PasswordFile::parse(&format!("robot-7:{}\n", hash_password("s3cret"))).expect("parses");
        assert!(file.verify("robot-7", b"s3cret"));
        assert!(!file.verify("robot-7", b"s3cret "));
        assert!(!file.verify("robot-8", b"s3cret"));
    }

    #[test]
    fn the_older_sha512_form_verifies() {
        let salt = b"0123456789ab";
        let mut h = Sha512::new();
        h.update(b"pw");
        h.update(salt);
        let line = format!(
            "u:$6${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(h.finalize())
        );
        assert!(PasswordFile::parse(&line)
            .expect("parses")
            .verify("u", b"pw"));
    }

    #[test]
    fn plain_text_and_garbage_lines_are_refused_with_their_line_number() {
        assert_eq!(
            PasswordFile::parse("# users\n\nalice:plain\n")
                .map(|_| ())
                .unwrap_err()
                .0,
            3
        );
        assert!(PasswordFile::parse("no-colon").is_err());
        assert!(PasswordFile::parse("a:$7$0$AA==$AA==").is_err());
    }
}
