//! The little URL syntax of `--blob` and `--consensus` (DESIGN §9): `scheme://rest?key=value&key=value`.
//!
//! **What this is.** A splitter into scheme, the part after `://` and the query parameters, with
//! percent-decoding of the parameter values; [`crate::blob::BlobConfig`] and
//! [`crate::consensus::ConsensusConfig`] turn the pieces into typed configurations. **What this is not:** a
//! general URL parser (no user info, port or fragment handling beyond what the backends pass on).
//!
//! **Tests.** Unit tests below; the configurations' parsing in their modules.

use std::collections::BTreeMap;

/// Why a `--blob` or `--consensus` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The string has no `scheme://`.
    #[error("{url:?} is not a URL of the form scheme://...")]
    NoScheme {
        /// The input.
        url: String,
    },
    /// The scheme is not one this kind of store knows.
    #[error("unknown {what} scheme {scheme:?} in {url:?}; expected one of {expected}")]
    UnknownScheme {
        /// `blob` or `consensus`.
        what: &'static str,
        /// The scheme found.
        scheme: String,
        /// The input.
        url: String,
        /// The schemes accepted, e.g. `file, s3, mem`.
        expected: &'static str,
    },
    /// The scheme is known, but the backend was not compiled in.
    #[error("{url:?} needs the {backend} backend: build the storage crate with feature `{feature}`")]
    FeatureDisabled {
        /// The input.
        url: String,
        /// The backend, e.g. `S3`.
        backend: &'static str,
        /// The cargo feature that compiles it in.
        feature: &'static str,
    },
    /// Something after the scheme is wrong.
    #[error("invalid {what} URL {url:?}: {reason}")]
    Invalid {
        /// `blob` or `consensus`.
        what: &'static str,
        /// The input.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// A URL split into its pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SplitUrl {
    pub(crate) scheme: String,
    /// Everything between `://` and `?` (not decoded).
    pub(crate) rest: String,
    /// The query parameters, decoded.
    pub(crate) params: BTreeMap<String, String>,
}

impl SplitUrl {
    /// Splits `url`; `what` names the store in errors.
    pub(crate) fn parse(url: &str, what: &'static str) -> Result<SplitUrl, UrlError> {
        let Some((scheme, after)) = url.split_once("://") else {
            return Err(UrlError::NoScheme { url: url.to_owned() });
        };
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') {
            return Err(UrlError::NoScheme { url: url.to_owned() });
        }
        let (rest, query) = after.split_once('?').unwrap_or((after, ""));
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let invalid = |reason: String| UrlError::Invalid { what, url: url.to_owned(), reason };
            let value = percent_decode(value).map_err(invalid)?;
            if params.insert(key.to_owned(), value).is_some() {
                return Err(UrlError::Invalid {
                    what,
                    url: url.to_owned(),
                    reason: format!("parameter {key:?} is given twice"),
                });
            }
        }
        Ok(SplitUrl { scheme: scheme.to_ascii_lowercase(), rest: rest.to_owned(), params })
    }

    /// Takes parameter `key` out, if present.
    pub(crate) fn take(&mut self, key: &str) -> Option<String> {
        self.params.remove(key)
    }

    /// Refuses any parameter not taken yet: a setting the code does not honour is refused, not ignored.
    pub(crate) fn finish(&self, what: &'static str, url: &str) -> Result<(), UrlError> {
        match self.params.keys().next() {
            None => Ok(()),
            Some(key) => Err(UrlError::Invalid {
                what,
                url: url.to_owned(),
                reason: format!("unknown parameter {key:?}"),
            }),
        }
    }
}

fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(|| format!("truncated escape in {value:?}"))?;
                let hex = std::str::from_utf8(hex).map_err(|_| format!("bad escape in {value:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {value:?}"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_rest_and_decoded_parameters() {
        let url = SplitUrl::parse("S3://bucket/a/b?endpoint=http%3A%2F%2F127.0.0.1%3A9000&region=x", "blob")
            .unwrap();
        assert_eq!(url.scheme, "s3");
        assert_eq!(url.rest, "bucket/a/b");
        assert_eq!(url.params["endpoint"], "http://127.0.0.1:9000");
        assert_eq!(url.params["region"], "x");
        assert_eq!(SplitUrl::parse("mem://", "blob").unwrap().rest, "");
    }

    #[test]
    fn malformed_urls_are_refused_with_the_reason() {
        let cases = [
            ("/just/a/path", "not a URL"),
            ("://x", "not a URL"),
            ("file:///x?a=1&a=2", "given twice"),
            ("file:///x?a=%zz", "bad escape"),
            ("file:///x?a=%2", "truncated escape"),
        ];
        for (input, expected) in cases {
            let error = SplitUrl::parse(input, "blob").unwrap_err().to_string();
            assert!(error.contains(expected), "{input}: {error}");
        }
        let url = SplitUrl::parse("file:///x?unknown=1", "blob").unwrap();
        assert!(
            url.finish("blob", "file:///x?unknown=1").unwrap_err().to_string().contains("unknown parameter")
        );
    }
}
