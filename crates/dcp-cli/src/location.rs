//! Where a checkpoint lives: every command's path or URL argument goes to
//! [`dcp::open`], which maps it to a storage backend with dcp-core's one
//! table of schemes ([`dcp::location`]).

use crate::CliError;
use dcp::{Backend, ErrorKind, FileSystem, Location};
use std::collections::HashMap;
use std::sync::Arc;

/// Open the checkpoint location `s` with [`dcp::open`] (no storage options;
/// S3 settings come from the standard `AWS_*` environment variables): a plain
/// path (`ckpt/step100`, `/data/ckpt`) or `file:///abs/path` opens the local
/// file system; `s3://bucket/prefix` (feature `object-store`, on by default),
/// `gs://` (feature `gcs`), `azblob://` (feature `azblob`) and
/// `memory://name` open object stores through OpenDAL.
///
/// A malformed location or an unknown scheme is a usage error (exit status
/// 2); a location this build cannot serve is a failure (exit status 1) that
/// names the feature of this command to build it with.
pub fn open_location(s: &str) -> Result<Arc<dyn FileSystem>, CliError> {
    let opened = dcp::open(s, &HashMap::new());
    if let Ok(fs) = &opened {
        tracing::debug!(input = s, location = %fs.location(), "opened location");
    }
    opened.map_err(|e| match e.kind() {
        ErrorKind::InvalidInput => CliError::usage(e.to_string()),
        ErrorKind::Unsupported => {
            let feature = Location::parse(s).ok().and_then(|l| match l.backend() {
                Backend::S3 => Some("object-store"),
                Backend::Gcs => Some("gcs"),
                Backend::Azblob => Some("azblob"),
                _ => None,
            });
            match feature {
                Some(f) => CliError::msg(format!(
                    "{e} (for the dcp command: build dcp-cli with its \"{f}\" feature)"
                )),
                None => CliError::from(e),
            }
        }
        _ => CliError::from(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls() {
        let tmp = std::env::temp_dir();
        for input in [
            "ckpt".to_string(),
            tmp.display().to_string(),
            format!("file://{}", tmp.display()),
            format!("FILE://{}", tmp.display()),
            format!("file://localhost{}", tmp.display()),
            "odd name://x".to_string(),
        ] {
            open_location(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
        }
        let fs = open_location("memory://cli-location-test").unwrap();
        assert_eq!(fs.location(), "memory://cli-location-test");
        for (input, msg) in [
            ("file://relative/x", "absolute path"),
            ("ftp://host/x", "unknown location scheme ftp://"),
            ("https://host/x", "unknown location scheme https://"),
            ("s3:///prefix", "names no bucket"),
            ("", "empty"),
        ] {
            let e = open_location(input).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{input}");
            let e = e.to_string();
            assert!(e.contains(msg), "{input}: {e}");
        }
        let e = open_location("ftp://host/x").unwrap_err().to_string();
        assert!(
            e.contains("accepted: a path, file://, memory://, s3://"),
            "{e}"
        );
    }

    #[cfg(not(feature = "object-store"))]
    #[test]
    fn s3_is_refused_naming_the_feature() {
        let e = open_location("s3://bucket/prefix").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        let e = e.to_string();
        assert!(e.starts_with("s3://bucket/prefix: "), "{e}");
        assert!(e.contains("\"s3\" feature of the dcp crate"), "{e}");
        assert!(e.contains("\"object-store\" feature"), "{e}");
    }

    #[cfg(not(feature = "gcs"))]
    #[test]
    fn gcs_is_refused_naming_the_feature() {
        let e = open_location("gs://b/p").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        let e = e.to_string();
        assert!(e.contains("\"gcs\" feature of the dcp crate"), "{e}");
        assert!(e.contains("dcp-cli with its \"gcs\" feature"), "{e}");
    }

    #[cfg(feature = "object-store")]
    #[test]
    fn s3_opens_through_opendal() {
        let fs = open_location("s3://bucket/prefix").unwrap();
        assert_eq!(fs.location(), "s3://bucket/prefix");
    }
}
