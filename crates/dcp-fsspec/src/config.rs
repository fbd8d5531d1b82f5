//! Turning a URL plus fsspec-style `storage_options` into an OpenDAL
//! [`Operator`] rooted at the checkpoint prefix, and the tuning knobs of
//! [`OpendalOptions`].

use crate::OpendalOptions;
use dcp_core::{Error, Result};
use opendal::Operator;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The storage backend a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    S3,
    Gcs,
    Azblob,
    Fs,
    Memory,
}

impl Scheme {
    /// The Cargo feature of dcp-fsspec that enables this backend, if any.
    fn feature(self) -> Option<&'static str> {
        match self {
            Scheme::S3 => Some("s3"),
            Scheme::Gcs => Some("gcs"),
            Scheme::Azblob => Some("azblob"),
            Scheme::Fs | Scheme::Memory => None,
        }
    }

    fn enabled(self) -> bool {
        match self {
            Scheme::S3 => cfg!(feature = "s3"),
            Scheme::Gcs => cfg!(feature = "gcs"),
            Scheme::Azblob => cfg!(feature = "azblob"),
            Scheme::Fs | Scheme::Memory => true,
        }
    }

    /// Whether a completed write is durable (an upload, or an fsynced file).
    pub(crate) fn durable(self) -> bool {
        !matches!(self, Scheme::Memory)
    }
}

/// A parsed checkpoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub scheme: Scheme,
    /// Bucket, container, or memory store name (empty for `file://`).
    pub bucket: String,
    /// The prefix inside the bucket, without leading or trailing `/`; for
    /// `file://`, the absolute directory.
    pub prefix: String,
    /// The URL as given (normalised), for messages.
    pub url: String,
}

/// Parse `url`: `s3://bucket/prefix`, `gs://bucket/prefix`,
/// `azblob://container/prefix`, `file:///abs/path`, `memory://name/prefix`,
/// or a plain local path.
pub(crate) fn parse_url(url: &str) -> Result<Target> {
    let Some((scheme_str, rest)) = url.split_once("://") else {
        // fsspec treats a plain path as local.
        if url.is_empty() {
            return Err(Error::invalid("empty checkpoint URL"));
        }
        let path = std::path::absolute(url)
            .map_err(|e| Error::invalid(format!("cannot make {url:?} absolute: {e}")))?;
        let path = path.to_string_lossy().into_owned();
        return Ok(Target {
            scheme: Scheme::Fs,
            bucket: String::new(),
            url: format!("file://{path}"),
            prefix: path,
        });
    };
    let scheme = match scheme_str.to_ascii_lowercase().as_str() {
        "s3" | "s3a" => Scheme::S3,
        "gs" | "gcs" => Scheme::Gcs,
        "azblob" | "az" => Scheme::Azblob,
        "file" => Scheme::Fs,
        "memory" => Scheme::Memory,
        other => {
            return Err(Error::unsupported(format!(
                "unsupported URL scheme {other:?} in {url}: dcp-fsspec handles s3://, gs://, azblob://, file:// and memory://"
            )))
        }
    };
    if !scheme.enabled() {
        let feature = scheme.feature().unwrap_or("?");
        return Err(Error::unsupported(format!(
            "{url}: {scheme_str}:// needs the `{feature}` feature of dcp-fsspec, which this build lacks \
             (enable it: dcp-fsspec = {{ features = [\"{feature}\"] }})"
        )));
    }
    if scheme == Scheme::Fs {
        let path = if rest.starts_with('/') {
            rest.to_string()
        } else if let Some(p) = rest.strip_prefix("localhost/") {
            format!("/{p}")
        } else {
            return Err(Error::invalid(format!(
                "{url}: a file URL needs an absolute path (file:///abs/path)"
            )));
        };
        let trimmed = path.trim_end_matches('/');
        let path = if trimmed.is_empty() { "/" } else { trimmed }.to_string();
        return Ok(Target {
            scheme,
            bucket: String::new(),
            url: format!("file://{path}"),
            prefix: path,
        });
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() && scheme != Scheme::Memory {
        return Err(Error::invalid(format!(
            "{url}: the URL names no bucket ({scheme_str}://bucket/prefix)"
        )));
    }
    let prefix = prefix
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>();
    if prefix.iter().any(|s| *s == "." || *s == "..") {
        return Err(Error::invalid(format!(
            "{url}: the prefix may not contain `.` or `..` segments"
        )));
    }
    let prefix = prefix.join("/");
    let url = if prefix.is_empty() {
        format!("{scheme_str}://{bucket}")
    } else {
        format!("{scheme_str}://{bucket}/{prefix}")
    };
    Ok(Target {
        scheme,
        bucket: bucket.to_string(),
        prefix,
        url,
    })
}

/// The OpenDAL root for a prefix: `/prefix/`.
fn root_of(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        format!("/{prefix}/")
    }
}

/// Keys of `storage_options` that tune dcp itself rather than the service.
const DCP_KEYS: &[&str] = &[
    "dcp_part_size",
    "dcp_write_concurrency",
    "dcp_read_chunk",
    "dcp_read_concurrency",
    "dcp_max_retries",
    "dcp_retry_min_delay_ms",
    "dcp_retry_max_delay_ms",
    "dcp_timeout_ms",
    "dcp_io_timeout_ms",
];

fn parse_size(key: &str, v: &str) -> Result<usize> {
    let t = v.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(s, m)| t.strip_suffix(s).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            Error::invalid(format!(
                "storage option {key}={v:?} is not a size (bytes, or with KiB/MiB/GiB)"
            ))
        })
}

fn parse_u64(key: &str, v: &str) -> Result<u64> {
    v.trim().parse::<u64>().map_err(|_| {
        Error::invalid(format!(
            "storage option {key}={v:?} is not a non-negative integer"
        ))
    })
}

/// Apply the `dcp_*` keys of `storage_options` to `opts`.
pub(crate) fn apply_dcp_options(
    opts: &mut OpendalOptions,
    storage_options: &HashMap<String, String>,
) -> Result<()> {
    for (k, v) in storage_options {
        match k.as_str() {
            "dcp_part_size" => opts.part_size = parse_size(k, v)?,
            "dcp_write_concurrency" => opts.write_concurrency = parse_u64(k, v)? as usize,
            "dcp_read_chunk" => opts.read_chunk = parse_size(k, v)?,
            "dcp_read_concurrency" => opts.read_concurrency = parse_u64(k, v)? as usize,
            "dcp_max_retries" => opts.max_retries = parse_u64(k, v)? as usize,
            "dcp_retry_min_delay_ms" => {
                opts.retry_min_delay = Duration::from_millis(parse_u64(k, v)?)
            }
            "dcp_retry_max_delay_ms" => {
                opts.retry_max_delay = Duration::from_millis(parse_u64(k, v)?)
            }
            "dcp_timeout_ms" => opts.timeout = Duration::from_millis(parse_u64(k, v)?),
            "dcp_io_timeout_ms" => opts.io_timeout = Duration::from_millis(parse_u64(k, v)?),
            _ => {}
        }
    }
    Ok(())
}

/// fsspec (s3fs) spellings of S3 settings, mapped to OpenDAL's.
fn s3_alias(key: &str) -> &str {
    match key {
        "key" | "aws_access_key_id" => "access_key_id",
        "secret" | "aws_secret_access_key" => "secret_access_key",
        "token" | "aws_session_token" => "session_token",
        "endpoint_url" | "aws_endpoint_url" | "aws_endpoint" => "endpoint",
        "region_name" | "aws_region" => "region",
        other => other,
    }
}

/// Service configuration: environment first (S3 only), then the URL's
/// bucket and root, then `storage_options` (which override both).
pub(crate) fn service_config(
    t: &Target,
    storage_options: &HashMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    let mut cfg = HashMap::new();
    let user = storage_options
        .iter()
        .filter(|(k, _)| !DCP_KEYS.contains(&k.as_str()));
    match t.scheme {
        Scheme::S3 => {
            let from_env = [
                ("endpoint", &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"][..]),
                ("region", &["AWS_REGION", "AWS_DEFAULT_REGION"][..]),
                ("access_key_id", &["AWS_ACCESS_KEY_ID"][..]),
                ("secret_access_key", &["AWS_SECRET_ACCESS_KEY"][..]),
                ("session_token", &["AWS_SESSION_TOKEN"][..]),
            ];
            for (key, vars) in from_env {
                if let Some(v) = vars.iter().find_map(|v| env(v).filter(|s| !s.is_empty())) {
                    cfg.insert(key.to_string(), v);
                }
            }
            cfg.insert("bucket".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            for (k, v) in user {
                cfg.insert(s3_alias(k).to_string(), v.clone());
            }
            // Most S3-compatible servers ignore the region, but signing needs one.
            cfg.entry("region".into())
                .or_insert_with(|| "us-east-1".into());
        }
        Scheme::Gcs => {
            cfg.insert("bucket".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            cfg.extend(user.map(|(k, v)| (k.clone(), v.clone())));
        }
        Scheme::Azblob => {
            cfg.insert("container".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            cfg.extend(user.map(|(k, v)| (k.clone(), v.clone())));
        }
        Scheme::Fs => {
            cfg.insert("root".into(), t.prefix.clone());
            // Writes go to a temporary file that is fsynced and renamed into
            // place on close: nothing is visible under a name until complete,
            // and `abort` removes the temporary file.
            let tmp = format!("{}/.dcp-opendal-tmp", t.prefix.trim_end_matches('/'));
            cfg.insert("atomic_write_dir".into(), tmp);
            cfg.extend(user.map(|(k, v)| (k.clone(), v.clone())));
        }
        Scheme::Memory => {
            cfg.insert("root".into(), root_of(&t.prefix));
        }
    }
    cfg
}

/// The endpoint the configuration talks to, for messages.
pub(crate) fn endpoint_of(t: &Target, cfg: &HashMap<String, String>) -> String {
    match t.scheme {
        Scheme::S3 => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://s3.amazonaws.com (default)".into()),
        Scheme::Gcs => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://storage.googleapis.com (default)".into()),
        Scheme::Azblob => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "(endpoint not set)".into()),
        Scheme::Fs => "local file system".into(),
        Scheme::Memory => "process memory".into(),
    }
}

/// Memory stores by name: `memory://name` means the same store everywhere
/// in the process (as in fsspec), so a writer and a reader opened from the
/// same URL see the same objects.
fn memory_store(name: &str) -> Result<Operator> {
    static STORES: OnceLock<Mutex<HashMap<String, Operator>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(op) = stores.get(name) {
        return Ok(op.clone());
    }
    let op = Operator::new(opendal::services::Memory::default())
        .map_err(|e| Error::invalid(format!("memory://{name}: {e}")))?;
    stores.insert(name.to_string(), op.clone());
    Ok(op)
}

/// Build the operator for `t` with the service configuration `cfg`.
pub(crate) fn build_operator(t: &Target, cfg: HashMap<String, String>) -> Result<Operator> {
    let built = match t.scheme {
        Scheme::Memory => {
            // The store is shared per name; the prefix is a layer of paths
            // inside it, handled by `OpendalFs` (the memory service's own
            // root would give each prefix a separate map).
            return memory_store(&t.bucket);
        }
        Scheme::Fs => Operator::from_iter::<opendal::services::Fs>(cfg),
        #[cfg(feature = "s3")]
        Scheme::S3 => Operator::from_iter::<opendal::services::S3>(cfg),
        #[cfg(feature = "gcs")]
        Scheme::Gcs => Operator::from_iter::<opendal::services::Gcs>(cfg),
        #[cfg(feature = "azblob")]
        Scheme::Azblob => Operator::from_iter::<opendal::services::Azblob>(cfg),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(Error::unsupported(format!(
                "{}: this build of dcp-fsspec lacks the feature for it",
                t.url
            )))
        }
    };
    built.map_err(|e| {
        Error::new(
            dcp_core::ErrorKind::InvalidInput,
            format!("cannot configure storage for {}: {e}", t.url),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "s3")]
    #[test]
    fn s3_urls() {
        let t = parse_url("s3://bkt/a/b/").unwrap();
        assert_eq!(t.scheme, Scheme::S3);
        assert_eq!(t.bucket, "bkt");
        assert_eq!(t.prefix, "a/b");
        assert_eq!(t.url, "s3://bkt/a/b");
        let t = parse_url("s3://bkt").unwrap();
        assert_eq!(t.prefix, "");
        assert_eq!(
            parse_url("s3:///p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_url("s3://b/../p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn urls() {
        let t = parse_url("file:///tmp/x/").unwrap();
        assert_eq!((t.scheme, t.prefix.as_str()), (Scheme::Fs, "/tmp/x"));
        let t = parse_url("memory://m/p").unwrap();
        assert_eq!((t.scheme, t.bucket.as_str()), (Scheme::Memory, "m"));
        assert_eq!(
            parse_url("ftp://x/y").unwrap_err().kind(),
            dcp_core::ErrorKind::Unsupported
        );
        assert_eq!(
            parse_url("memory://m/../p").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_url("file://rel/path").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
        );
        #[cfg(not(feature = "s3"))]
        {
            let e = parse_url("s3://b/p").unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::Unsupported);
            assert!(e.message().contains("`s3` feature"), "{e}");
        }
        #[cfg(not(feature = "gcs"))]
        {
            let e = parse_url("gs://b/p").unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::Unsupported);
            assert!(e.message().contains("`gcs` feature"), "{e}");
        }
    }

    #[cfg(feature = "s3")]
    #[test]
    fn storage_options_override_env() {
        let t = parse_url("s3://b/p").unwrap();
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some("http://env:1".to_string()),
            "AWS_REGION" => Some("eu-west-1".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("envkey".to_string()),
            _ => None,
        };
        let opts: HashMap<String, String> = [
            ("endpoint_url".to_string(), "http://opt:2".to_string()),
            ("dcp_part_size".to_string(), "8MiB".to_string()),
        ]
        .into();
        let cfg = service_config(&t, &opts, &env);
        assert_eq!(cfg["endpoint"], "http://opt:2");
        assert_eq!(cfg["region"], "eu-west-1");
        assert_eq!(cfg["access_key_id"], "envkey");
        assert_eq!(cfg["root"], "/p/");
        assert_eq!(cfg["bucket"], "b");
        assert!(!cfg.contains_key("dcp_part_size"));
        let cfg = service_config(&t, &HashMap::new(), &|_| None);
        assert_eq!(cfg["region"], "us-east-1");
        assert!(!cfg.contains_key("endpoint"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("k", "5MiB").unwrap(), 5 << 20);
        assert_eq!(parse_size("k", "123").unwrap(), 123);
        assert_eq!(parse_size("k", "2 K").unwrap(), 2048);
        parse_size("k", "lots").unwrap_err();
        parse_size("k", "99999999999999999999GiB").unwrap_err();
    }
}
