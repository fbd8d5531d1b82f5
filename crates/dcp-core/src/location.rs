//! Where a checkpoint lives: the one table of location schemes.
//!
//! A location is a plain path (`ckpt/step100`, `/data/ckpt`), a
//! `file:///abs/path` URL, or an object-store URL (`s3://bucket/prefix`,
//! `gs://bucket/prefix`, `azblob://container/prefix`, `memory://name/prefix`).
//! [`Location::parse`] turns such a string into a [`Location`] naming its
//! [`Backend`]; every crate that maps locations to storage (the `dcp` facade,
//! dcp-fsspec, the `dcp` command) goes through it, so they accept the same
//! schemes and refuse the others with the same message.
//!
//! dcp-core itself opens nothing: it has no storage backends and no cargo
//! features. [`Backend::feature`] names the cargo feature of the `dcp` crate
//! that serves a backend, for the messages of the crates that do open them.

use crate::error::{Error, Result};
use std::fmt;
use std::path::Path;

/// The kind of storage a [`Location`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// The local file system: a plain path or `file:///abs/path`.
    Local,
    /// A store in the memory of this process, one per name: `memory://name`.
    Memory,
    /// Amazon S3 and S3-compatible stores: `s3://bucket/prefix`.
    S3,
    /// Google Cloud Storage: `gs://bucket/prefix`.
    Gcs,
    /// Azure Blob Storage: `azblob://container/prefix`.
    Azblob,
}

/// One row of the scheme table: a backend, the URL schemes that name it, and
/// the cargo feature of the `dcp` crate that serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemeInfo {
    /// The backend.
    pub backend: Backend,
    /// URL schemes naming it, lower case, the canonical one first.
    pub schemes: &'static [&'static str],
    /// The cargo feature of the `dcp` crate that serves it (dcp-fsspec's
    /// feature of the same name, for object stores); `None` if always served.
    pub feature: Option<&'static str>,
    /// An example location, for messages.
    pub example: &'static str,
}

/// Every scheme dcp accepts, by backend. Matching is case-insensitive.
pub const SCHEMES: &[SchemeInfo] = &[
    SchemeInfo {
        backend: Backend::Local,
        schemes: &["file"],
        feature: Some("fs"),
        example: "file:///abs/path",
    },
    SchemeInfo {
        backend: Backend::Memory,
        schemes: &["memory"],
        feature: None,
        example: "memory://name/prefix",
    },
    SchemeInfo {
        backend: Backend::S3,
        schemes: &["s3", "s3a"],
        feature: Some("s3"),
        example: "s3://bucket/prefix",
    },
    SchemeInfo {
        backend: Backend::Gcs,
        schemes: &["gs", "gcs"],
        feature: Some("gcs"),
        example: "gs://bucket/prefix",
    },
    SchemeInfo {
        backend: Backend::Azblob,
        schemes: &["azblob", "az", "azure", "abfs", "abfss"],
        feature: Some("azblob"),
        example: "azblob://container/prefix",
    },
];

impl Backend {
    /// This backend's row of [`SCHEMES`].
    pub fn info(self) -> &'static SchemeInfo {
        SCHEMES
            .iter()
            .find(|s| s.backend == self)
            .expect("every backend has a row in SCHEMES")
    }

    /// The backend a URL scheme names (case-insensitive), if any.
    pub fn from_scheme(scheme: &str) -> Option<Backend> {
        let scheme = scheme.to_ascii_lowercase();
        SCHEMES
            .iter()
            .find(|s| s.schemes.contains(&scheme.as_str()))
            .map(|s| s.backend)
    }

    /// The URL schemes naming this backend, the canonical one first.
    pub fn schemes(self) -> &'static [&'static str] {
        self.info().schemes
    }

    /// The cargo feature of the `dcp` crate that serves this backend (`"s3"`,
    /// `"gcs"`, `"azblob"`, `"fs"` for local paths), or `None` when every
    /// build serves it (`memory://`).
    pub fn feature(self) -> Option<&'static str> {
        self.info().feature
    }

    /// Whether this is a remote object store (S3, GCS, Azure Blob).
    pub fn is_object_store(self) -> bool {
        matches!(self, Backend::S3 | Backend::Gcs | Backend::Azblob)
    }

    /// A name for people: `local file system`, `S3`, ...
    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local file system",
            Backend::Memory => "memory",
            Backend::S3 => "S3",
            Backend::Gcs => "Google Cloud Storage",
            Backend::Azblob => "Azure Blob Storage",
        }
    }
}

/// The accepted locations, for messages: `a path, file://, memory://, s3://
/// (s3a://), ...`.
pub fn accepted_schemes() -> String {
    let mut out = String::from("a path");
    for s in SCHEMES {
        out.push_str(", ");
        out.push_str(s.schemes[0]);
        out.push_str("://");
        if s.schemes.len() > 1 {
            let rest: Vec<String> = s.schemes[1..].iter().map(|x| format!("{x}://")).collect();
            out.push_str(&format!(" ({})", rest.join(", ")));
        }
    }
    out
}

/// A parsed checkpoint location. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    backend: Backend,
    /// The scheme as given, lower case; empty for a plain path.
    scheme: String,
    /// Bucket, container or memory store name; empty for local locations.
    bucket: String,
    /// Local: the path. Otherwise the prefix inside the bucket, without
    /// leading or trailing `/` and without empty segments.
    path: String,
    /// The string parsed.
    given: String,
}

impl Location {
    /// Parse `s`:
    ///
    /// * a plain path (relative or absolute; also anything whose text before
    ///   `://` is not a URL scheme, such as `odd name://x`) and
    ///   `file:///abs/path` or `file://localhost/abs/path`: [`Backend::Local`];
    /// * `memory://name/prefix`: [`Backend::Memory`];
    /// * `s3://`, `s3a://`, `gs://`, `gcs://`, `azblob://`, `az://`,
    ///   `azure://`, `abfs://`, `abfss://` followed by `bucket/prefix`: the
    ///   object stores of [`SCHEMES`].
    ///
    /// Refuses with [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput):
    /// an empty string; a `file://` URL whose path is relative
    /// (`file://x/y`) or percent-encoded; an object-store URL without a
    /// bucket or with `.`/`..` segments in its prefix; an Azure URL naming
    /// the account (`abfs://container@account...`: pass the account in the
    /// storage options); and any other scheme (`ftp://`, `http://`), with a
    /// message naming it and listing the accepted ones. Parsing checks the
    /// syntax only: whether this build can open the backend is up to the
    /// crate that opens it.
    pub fn parse(s: &str) -> Result<Location> {
        if s.is_empty() {
            return Err(Error::invalid("the checkpoint location is empty"));
        }
        let local = |path: String| Location {
            backend: Backend::Local,
            scheme: String::new(),
            bucket: String::new(),
            path,
            given: s.to_string(),
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(local(s.to_string()));
        };
        let scheme_ok = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
        if !scheme_ok {
            // `odd name://x` is a relative path, not a URL.
            return Ok(local(s.to_string()));
        }
        let lower = scheme.to_ascii_lowercase();
        let Some(backend) = Backend::from_scheme(&lower) else {
            return Err(Error::invalid(format!(
                "{s}: unknown location scheme {lower}://; accepted: {}",
                accepted_schemes()
            )));
        };
        if backend == Backend::Local {
            // file:///abs/path, or file://localhost/abs/path.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(Error::invalid(format!(
                    "{s}: a file URL needs an absolute path (file:///abs/path)"
                )));
            }
            if path.contains('%') {
                return Err(Error::invalid(format!(
                    "{s}: percent-encoded file URLs are not supported; pass the plain path"
                )));
            }
            let trimmed = path.trim_end_matches('/');
            let path = if trimmed.is_empty() { "/" } else { trimmed };
            return Ok(Location {
                scheme: lower,
                ..local(path.to_string())
            });
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() && backend != Backend::Memory {
            return Err(Error::invalid(format!(
                "{s}: the URL names no bucket ({lower}://bucket/prefix)"
            )));
        }
        if backend == Backend::Azblob && bucket.contains('@') {
            return Err(Error::invalid(format!(
                "{s}: give the container only ({lower}://container/prefix) and the account \
                 in the storage options (account_name, endpoint)"
            )));
        }
        let segments: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        if segments.iter().any(|p| *p == "." || *p == "..") {
            return Err(Error::invalid(format!(
                "{s}: the prefix may not contain `.` or `..` segments"
            )));
        }
        Ok(Location {
            backend,
            scheme: lower,
            bucket: bucket.to_string(),
            path: segments.join("/"),
            given: s.to_string(),
        })
    }

    /// The backend this location names.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL scheme as given, lower case (`s3a`); empty for a plain path.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The bucket, container or memory store name; empty for local paths.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The prefix inside the bucket, without leading or trailing `/` (empty
    /// for the bucket's root); for a local location, its path.
    pub fn prefix(&self) -> &str {
        &self.path
    }

    /// The local path, for [`Backend::Local`] (as given, not made absolute).
    pub fn local_path(&self) -> Option<&Path> {
        (self.backend == Backend::Local).then(|| Path::new(&self.path))
    }

    /// The string this location was parsed from.
    pub fn as_str(&self) -> &str {
        &self.given
    }

    /// The cargo feature of the `dcp` crate that serves this location (see
    /// [`Backend::feature`]).
    pub fn feature(&self) -> Option<&'static str> {
        self.backend.feature()
    }

    /// The location normalised: `s3://bucket/prefix` (scheme as given),
    /// `file:///abs/path`, or a plain path as given.
    pub fn url(&self) -> String {
        match self.backend {
            Backend::Local if self.scheme.is_empty() => self.path.clone(),
            Backend::Local => format!("file://{}", self.path),
            _ if self.path.is_empty() => format!("{}://{}", self.scheme, self.bucket),
            _ => format!("{}://{}/{}", self.scheme, self.bucket, self.path),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

impl std::str::FromStr for Location {
    type Err = Error;
    fn from_str(s: &str) -> Result<Location> {
        Location::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn local_paths_and_file_urls() {
        for (input, want) in [
            ("ckpt", "ckpt"),
            ("/data/ckpt", "/data/ckpt"),
            ("file:///data/ckpt", "/data/ckpt"),
            ("file:///data/ckpt/", "/data/ckpt"),
            ("FILE:///data", "/data"),
            ("file://localhost/data/x", "/data/x"),
            ("file:///", "/"),
            ("odd name://x", "odd name://x"),
            ("a_b://x", "a_b://x"),
        ] {
            let l = Location::parse(input).unwrap();
            assert_eq!(l.backend(), Backend::Local, "{input}");
            assert_eq!(l.local_path(), Some(Path::new(want)), "{input}");
            assert_eq!(l.feature(), Some("fs"));
            assert_eq!(l.as_str(), input);
        }
        assert_eq!(Location::parse("ckpt").unwrap().url(), "ckpt");
        assert_eq!(
            Location::parse("file://localhost/d/").unwrap().url(),
            "file:///d"
        );
    }

    #[test]
    fn object_store_urls() {
        for (input, backend, bucket, prefix, url) in [
            ("s3://bkt/a/b/", Backend::S3, "bkt", "a/b", "s3://bkt/a/b"),
            ("S3A://bkt//a", Backend::S3, "bkt", "a", "s3a://bkt/a"),
            ("s3://bkt", Backend::S3, "bkt", "", "s3://bkt"),
            ("gs://b/p", Backend::Gcs, "b", "p", "gs://b/p"),
            ("gcs://b/p", Backend::Gcs, "b", "p", "gcs://b/p"),
            ("azblob://c/p", Backend::Azblob, "c", "p", "azblob://c/p"),
            ("az://c/p", Backend::Azblob, "c", "p", "az://c/p"),
            ("azure://c/p", Backend::Azblob, "c", "p", "azure://c/p"),
            ("abfs://c/p", Backend::Azblob, "c", "p", "abfs://c/p"),
            ("abfss://c/p", Backend::Azblob, "c", "p", "abfss://c/p"),
            ("memory://m/p", Backend::Memory, "m", "p", "memory://m/p"),
            ("memory://", Backend::Memory, "", "", "memory://"),
        ] {
            let l = Location::parse(input).unwrap();
            assert_eq!(l.backend(), backend, "{input}");
            assert_eq!((l.bucket(), l.prefix()), (bucket, prefix), "{input}");
            assert_eq!(l.url(), url, "{input}");
            assert_eq!(l.to_string(), url, "{input}");
            assert_eq!(l.local_path(), None);
        }
        assert_eq!(Backend::S3.feature(), Some("s3"));
        assert_eq!(Backend::Gcs.feature(), Some("gcs"));
        assert_eq!(Backend::Azblob.feature(), Some("azblob"));
        assert_eq!(Backend::Memory.feature(), None);
        assert!(Backend::S3.is_object_store() && !Backend::Memory.is_object_store());
    }

    #[test]
    fn refusals() {
        for (input, msg) in [
            ("", "empty"),
            ("file://relative/x", "absolute path"),
            ("file:///a%20b", "percent-encoded"),
            ("s3:///p", "names no bucket"),
            ("gs://", "names no bucket"),
            ("s3://b/../p", "`..`"),
            ("memory://m/./p", "`.`"),
            ("abfs://c@acct.dfs.core.windows.net/p", "account"),
        ] {
            let e = Location::parse(input).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{input}");
            assert!(e.message().contains(msg), "{input}: {e}");
        }
        for (input, scheme) in [
            ("ftp://host/x", "ftp://"),
            ("http://host/x", "http://"),
            ("HTTPS://host/x", "https://"),
            ("hdfs://x", "hdfs://"),
        ] {
            let e = Location::parse(input).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{input}");
            let m = e.message();
            assert!(m.contains("unknown location scheme"), "{m}");
            assert!(m.contains(scheme), "{m}");
            for accepted in [
                "file://",
                "memory://",
                "s3://",
                "gs://",
                "azblob://",
                "abfs://",
            ] {
                assert!(m.contains(accepted), "{m}");
            }
        }
    }

    #[test]
    fn the_table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for row in SCHEMES {
            assert!(!row.schemes.is_empty());
            for s in row.schemes {
                assert_eq!(*s, s.to_ascii_lowercase());
                assert!(seen.insert(*s), "{s} listed twice");
                assert_eq!(Backend::from_scheme(s), Some(row.backend));
            }
            let l = Location::parse(row.example).unwrap();
            assert_eq!(l.backend(), row.backend, "{}", row.example);
            assert_eq!(row.backend.info(), row);
        }
        assert_eq!(Backend::from_scheme("GS"), Some(Backend::Gcs));
        assert_eq!(Backend::from_scheme("http"), None);
    }
}
