//! [`SharedSecret`]: the key both ends of a connection prove they hold, and where it comes from.
//!
//! **Where a secret comes from.** A file ([`SharedSecret::from_file`], readable by its owner only) or an
//! environment variable ([`SharedSecret::from_env`], [`SECRET_ENV`] by convention): never a command-line
//! argument, which every user of the machine can read in `ps`. A process that starts others passes the
//! secret on in their environment ([`SharedSecret::expose`]), which only the same user (and root) can
//! read. A file's or variable's bytes are the secret, less one trailing newline.
//!
//! **Invariants.** A secret has at least [`MIN_SECRET_BYTES`] bytes; its bytes never appear in `Debug`
//! output or in an error.
//!
//! **Tests.** `mod tests` below (lengths, newlines, file permissions, the environment).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable the workspace's binaries read their shared secret from when no file is named.
pub const SECRET_ENV: &str = "CCR_SHARED_SECRET";

/// The shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// A shared secret. Cheap to clone; prints as `SharedSecret(<N bytes>)`.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret {
    bytes: Arc<[u8]>,
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedSecret(<{} bytes>)", self.bytes.len())
    }
}

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("a shared secret needs at least {MIN_SECRET_BYTES} bytes, this one has {len}")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// The file could not be read or written.
    #[error("shared secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file can be read by users other than its owner.
    #[error("shared secret file {path} is readable by others (mode {mode:o}); make it private (chmod 600)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The environment variable is not set (or empty).
    #[error("the environment variable {var} holds no shared secret")]
    Missing {
        /// The variable.
        var: String,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness for a secret: {0}")]
    Random(String),
}

impl SharedSecret {
    /// A secret of these bytes.
    ///
    /// # Examples
    /// ```
    /// use transport::SharedSecret;
    /// assert!(SharedSecret::new(b"sixteen bytes!!!".to_vec()).is_ok());
    /// assert!(SharedSecret::new(b"short".to_vec()).is_err());
    /// assert_eq!(format!("{:?}", SharedSecret::new(vec![7; 20]).unwrap()), "SharedSecret(<20 bytes>)");
    /// ```
    pub fn new(bytes: Vec<u8>) -> Result<SharedSecret, SecretError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort { len: bytes.len() });
        }
        Ok(SharedSecret { bytes: bytes.into() })
    }

    /// A fresh secret from the operating system's random number generator: 32 random bytes, written as
    /// 64 hexadecimal characters (so it can go into a file or an environment variable as it is).
    pub fn generate() -> Result<SharedSecret, SecretError> {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(|e| SecretError::Random(e.to_string()))?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        SharedSecret::new(hex.into_bytes())
    }

    /// The secret in `path`, less one trailing newline. Refused if the file is readable by its group or
    /// others (on Unix).
    pub fn from_file(path: &Path) -> Result<SharedSecret, SecretError> {
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(SecretError::Permissions { path: path.to_path_buf(), mode: mode & 0o777 });
            }
        }
        let bytes = std::fs::read(path).map_err(io)?;
        SharedSecret::new(strip_newline(bytes))
    }

    /// The secret in the environment variable `var`, less one trailing newline.
    pub fn from_env(var: &str) -> Result<SharedSecret, SecretError> {
        let missing = || SecretError::Missing { var: var.to_string() };
        let value = std::env::var_os(var).filter(|v| !v.is_empty()).ok_or_else(missing)?;
        #[cfg(unix)]
        let bytes = std::os::unix::ffi::OsStringExt::into_vec(value);
        #[cfg(not(unix))]
        let bytes = value.to_string_lossy().into_owned().into_bytes();
        SharedSecret::new(strip_newline(bytes))
    }

    /// Writes the secret to a new file at `path` that only its owner can read (mode 600 on Unix).
    pub fn write_to_file(&self, path: &Path) -> Result<(), SecretError> {
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        file.write_all(&self.bytes).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The secret's bytes, to hand to a child process in its environment ([`SECRET_ENV`]). The name is
    /// meant to stand out in review: nothing else should need them.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

fn strip_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_read_without_their_trailing_newline_and_short_ones_are_refused() {
        // (file contents, the secret it holds, or None if refused)
        let table: [(&[u8], Option<&[u8]>); 5] = [
            (b"0123456789abcdef\n", Some(b"0123456789abcdef")),
            (b"0123456789abcdef\r\n", Some(b"0123456789abcdef")),
            (b"0123456789abcdef\n\n", Some(b"0123456789abcdef\n")),
            (b"0123456789abcde\n", None),
            (b"", None),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (contents, expected)) in table.into_iter().enumerate() {
            let path = dir.path().join(format!("secret-{i}"));
            let secret = SharedSecret::new(contents.to_vec()).ok();
            if let Some(secret) = secret {
                secret.write_to_file(&path).unwrap();
            } else {
                std::fs::write(&path, contents).unwrap();
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                }
            }
            let read = SharedSecret::from_file(&path).ok();
            assert_eq!(read.as_ref().map(SharedSecret::expose), expected, "{contents:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(SharedSecret::from_file(&path), Err(SecretError::Permissions { mode: 0o644, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(SharedSecret::from_file(&path).is_ok());
    }

    #[test]
    fn generated_secrets_are_hex_text_and_differ() {
        let a = SharedSecret::generate().unwrap();
        let b = SharedSecret::generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a, b);
    }

    #[test]
    fn a_missing_environment_variable_is_an_error_naming_it() {
        let error = SharedSecret::from_env("CCR_TEST_SECRET_THAT_IS_NEVER_SET").unwrap_err();
        assert!(error.to_string().contains("CCR_TEST_SECRET_THAT_IS_NEVER_SET"), "{error}");
    }
}
