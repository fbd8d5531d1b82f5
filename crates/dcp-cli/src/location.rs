//! Where a checkpoint lives: the one place that maps a path or URL given on
//! the command line to a storage backend.

use crate::CliError;
use dcp_core::FileSystem;
use std::path::PathBuf;
use std::sync::Arc;

/// Schemes that name object stores, served by the dcp-fsspec crate when the
/// `object-store` feature is on (the default).
const OBJECT_STORE_SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "gcs", "az", "azblob", "azure", "abfs", "memory", "http", "https",
];

/// Open the checkpoint location `s`: a plain path (`ckpt/step100`,
/// `/data/ckpt`) or a `file:///abs/path` URL opens the local file system
/// (dcp-fs); an object-store URL (`s3://bucket/prefix`, `memory://name`, and
/// with the `gcs`/`azblob` features `gs://`, `azblob://`) opens it through
/// OpenDAL (dcp-fsspec), with S3 settings from the standard `AWS_*`
/// environment variables. A build without the `object-store` feature refuses
/// object-store URLs; any other scheme is refused as unknown.
pub fn open_location(s: &str) -> Result<Arc<dyn FileSystem>, CliError> {
    match local_path(s) {
        Ok(path) => Ok(Arc::new(dcp_fs::LocalFs::new(path))),
        Err(e) => open_object_store(s, e),
    }
}

#[cfg(feature = "object-store")]
fn open_object_store(s: &str, local_error: CliError) -> Result<Arc<dyn FileSystem>, CliError> {
    let scheme = s
        .split_once("://")
        .map(|(x, _)| x.to_ascii_lowercase())
        .unwrap_or_default();
    if !OBJECT_STORE_SCHEMES.contains(&scheme.as_str()) || scheme == "http" || scheme == "https" {
        return Err(local_error);
    }
    dcp_fsspec::open(s, &std::collections::HashMap::new()).map_err(CliError::from)
}

#[cfg(not(feature = "object-store"))]
fn open_object_store(_s: &str, local_error: CliError) -> Result<Arc<dyn FileSystem>, CliError> {
    Err(local_error)
}

/// The local path `s` names, or why it names none.
fn local_path(s: &str) -> Result<PathBuf, CliError> {
    if s.is_empty() {
        return Err(CliError::usage("the checkpoint location is empty"));
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Ok(PathBuf::from(s));
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !scheme_ok {
        // `weird dir://x` is a relative path, not a URL.
        return Ok(PathBuf::from(s));
    }
    let scheme = scheme.to_ascii_lowercase();
    if scheme == "file" {
        // file:///abs/path, or file://localhost/abs/path.
        let path = rest.strip_prefix("localhost").unwrap_or(rest);
        if !path.starts_with('/') {
            return Err(CliError::usage(format!(
                "{s}: a file URL needs an absolute path (file:///abs/path)"
            )));
        }
        if path.contains('%') {
            return Err(CliError::usage(format!(
                "{s}: percent-encoded file URLs are not supported; pass the plain path"
            )));
        }
        return Ok(PathBuf::from(path));
    }
    if OBJECT_STORE_SCHEMES.contains(&scheme.as_str()) {
        return Err(CliError::msg(format!(
            "{s}: {scheme}:// locations need object-store support, and this dcp was not built with object-store support"
        )));
    }
    Err(CliError::usage(format!(
        "{s}: unknown location scheme {scheme}://; use a path or file:///abs/path"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls() {
        for (input, want) in [
            ("ckpt", "ckpt"),
            ("/data/ckpt", "/data/ckpt"),
            ("file:///data/ckpt", "/data/ckpt"),
            ("FILE:///data", "/data"),
            ("file://localhost/data/x", "/data/x"),
            ("odd name://x", "odd name://x"),
        ] {
            assert_eq!(local_path(input).unwrap(), PathBuf::from(want), "{input}");
        }
        for (input, msg) in [
            ("s3://bucket/prefix", "not built with object-store support"),
            ("memory://x", "not built with object-store support"),
            ("gs://b/p", "not built with object-store support"),
            ("file://relative/x", "absolute path"),
            ("ftp://host/x", "unknown location scheme"),
            ("", "empty"),
        ] {
            let e = local_path(input).unwrap_err().to_string();
            assert!(e.contains(msg), "{input}: {e}");
        }
    }

    #[cfg(not(feature = "object-store"))]
    #[test]
    fn object_stores_are_refused_by_open_location() {
        let e = open_location("s3://bucket/prefix").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("s3://bucket/prefix: s3:// locations"),
            "{e}"
        );
    }

    #[cfg(feature = "object-store")]
    #[test]
    fn object_store_urls_open_through_opendal() {
        let fs = open_location("memory://cli-location-test").unwrap();
        assert_eq!(fs.location(), "memory://cli-location-test");
        let e = open_location("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("unknown location scheme"), "{e}");
        let e = open_location("https://host/x").unwrap_err().to_string();
        assert!(e.contains("object-store"), "{e}");
    }
}
