//! Turning a URL plus fsspec-style `storage_options` into an OpenDAL
//! [`Operator`] rooted at the checkpoint prefix, and the tuning knobs of
//! [`OpendalOptions`].

use crate::OpendalOptions;
use dcp_core::location::{Backend, Location};
use dcp_core::{Error, Result};
use opendal::Operator;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Whether this build of dcp-fsspec serves `backend`.
// The arms depend on the features; with none on they look like `matches!`.
#[allow(clippy::match_like_matches_macro)]
fn enabled(backend: Backend) -> bool {
    match backend {
        Backend::S3 => cfg!(feature = "s3"),
        Backend::Gcs => cfg!(feature = "gcs"),
        Backend::Azblob => cfg!(feature = "azblob"),
        _ => true,
    }
}

/// Whether a completed write is durable (an upload, or an fsynced file).
pub(crate) fn durable(backend: Backend) -> bool {
    backend != Backend::Memory
}

/// A parsed checkpoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// The backend, from dcp-core's one table of location schemes
    /// ([`dcp_core::location`]); `Local` is OpenDAL's `fs` service here.
    pub scheme: Backend,
    /// Bucket, container, or memory store name (empty for `file://`).
    pub bucket: String,
    /// The prefix inside the bucket, without leading or trailing `/`; for
    /// `file://`, the absolute directory.
    pub prefix: String,
    /// The URL as given (normalised), for messages.
    pub url: String,
}

/// Parse `url` with [`Location::parse`]: `s3://bucket/prefix`,
/// `gs://bucket/prefix`, `azblob://container/prefix`, `file:///abs/path`,
/// `memory://name/prefix`, or a plain local path (made absolute, as fsspec
/// does). A scheme outside dcp-core's table is `InvalidInput`; one whose
/// feature this build lacks is `Unsupported`, naming the feature.
pub(crate) fn parse_url(url: &str) -> Result<Target> {
    let loc = Location::parse(url)?;
    let scheme = loc.backend();
    if !enabled(scheme) {
        let feature = scheme.feature().unwrap_or("?");
        return Err(Error::unsupported(format!(
            "{url}: {}:// needs the `{feature}` feature of dcp-fsspec, which this build lacks \
             (enable it: dcp-fsspec = {{ features = [\"{feature}\"] }}, or the \"{feature}\" feature of the dcp crate)",
            loc.scheme()
        )));
    }
    if let Some(path) = loc.local_path() {
        // fsspec treats a plain path as local, relative to the working directory.
        let path = std::path::absolute(path)
            .map_err(|e| Error::invalid(format!("cannot make {url:?} absolute: {e}")))?;
        let path = path.to_string_lossy().into_owned();
        return Ok(Target {
            scheme,
            bucket: String::new(),
            url: format!("file://{path}"),
            prefix: path,
        });
    }
    Ok(Target {
        scheme,
        bucket: loc.bucket().to_string(),
        prefix: loc.prefix().to_string(),
        url: loc.url(),
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

/// Keys the URL sets (the service's bucket or container, and root, with
/// OpenDAL's aliases for them): a storage option may not change them.
const URL_KEYS: &[&str] = &[
    "root",
    "bucket",
    "aws_bucket",
    "aws_bucket_name",
    "bucket_name",
    "google_bucket",
    "google_bucket_name",
    "container",
    "azure_container_name",
    "container_name",
];

/// fsspec (s3fs) and AWS spellings of S3 settings that dcp maps to
/// OpenDAL's names itself (see [`s3_alias`]).
const S3_FSSPEC_KEYS: &[&str] = &[
    "key",
    "secret",
    "token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "endpoint_url",
    "aws_endpoint_url",
    "aws_endpoint",
    "region_name",
    "aws_region",
];

/// The field names (with their serde aliases) of an OpenDAL service's
/// configuration struct, read from its `Deserialize` implementation.
#[cfg(any(feature = "s3", feature = "gcs", feature = "azblob"))]
fn config_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// The OpenDAL configuration keys of `backend`'s service that dcp passes
/// through (empty for services this build lacks, `file://` and memory).
fn service_keys(backend: Backend) -> &'static [&'static str] {
    match backend {
        #[cfg(feature = "s3")]
        Backend::S3 => config_fields::<opendal::services::S3Config>(),
        #[cfg(feature = "gcs")]
        Backend::Gcs => config_fields::<opendal::services::GcsConfig>(),
        #[cfg(feature = "azblob")]
        Backend::Azblob => config_fields::<opendal::services::AzblobConfig>(),
        _ => &[],
    }
}

/// Every `storage_options` key accepted for `backend`, sorted: the `dcp_*`
/// keys, the s3fs spellings dcp maps for S3, and the OpenDAL configuration
/// keys of the service, less the ones the URL sets.
pub(crate) fn accepted_keys(backend: Backend) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = DCP_KEYS.to_vec();
    if backend == Backend::S3 {
        keys.extend_from_slice(S3_FSSPEC_KEYS);
    }
    keys.extend(
        service_keys(backend)
            .iter()
            .filter(|k| !URL_KEYS.contains(k)),
    );
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Refuse any key of `storage_options` that [`accepted_keys`] does not list
/// for `t` (OpenDAL would ignore it silently), and the keys the URL sets,
/// with [`ErrorKind::InvalidInput`](dcp_core::ErrorKind::InvalidInput).
pub(crate) fn check_keys(t: &Target, storage_options: &HashMap<String, String>) -> Result<()> {
    let accepted = accepted_keys(t.scheme);
    let mut keys: Vec<&str> = storage_options.keys().map(String::as_str).collect();
    keys.sort_unstable();
    for k in keys {
        if accepted.contains(&k) {
            continue;
        }
        if URL_KEYS.contains(&k) && !service_keys(t.scheme).is_empty() {
            return Err(Error::invalid(format!(
                "storage option {k:?} for {}: the URL sets it ({})",
                t.url,
                t.scheme.info().example
            )));
        }
        return Err(Error::invalid(format!(
            "unknown storage option {k:?} for {}; accepted: {}",
            t.url,
            accepted.join(", ")
        )));
    }
    Ok(())
}

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
        Backend::S3 => {
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
        Backend::Gcs => {
            cfg.insert("bucket".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            cfg.extend(user.map(|(k, v)| (k.clone(), v.clone())));
        }
        Backend::Azblob => {
            cfg.insert("container".into(), t.bucket.clone());
            cfg.insert("root".into(), root_of(&t.prefix));
            cfg.extend(user.map(|(k, v)| (k.clone(), v.clone())));
        }
        Backend::Local => {
            cfg.insert("root".into(), t.prefix.clone());
            // Writes go to a temporary file that is fsynced and renamed into
            // place on close: nothing is visible under a name until complete,
            // and `abort` removes the temporary file.
            let tmp = format!("{}/.dcp-opendal-tmp", t.prefix.trim_end_matches('/'));
            cfg.insert("atomic_write_dir".into(), tmp);
        }
        // Memory, and any backend dcp-core adds later (refused by
        // `build_operator`): no service settings.
        _ => {
            cfg.insert("root".into(), root_of(&t.prefix));
        }
    }
    cfg
}

/// The endpoint the configuration talks to, for messages.
pub(crate) fn endpoint_of(t: &Target, cfg: &HashMap<String, String>) -> String {
    match t.scheme {
        Backend::S3 => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://s3.amazonaws.com (default)".into()),
        Backend::Gcs => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "https://storage.googleapis.com (default)".into()),
        Backend::Azblob => cfg
            .get("endpoint")
            .cloned()
            .unwrap_or_else(|| "(endpoint not set)".into()),
        Backend::Local => "local file system".into(),
        _ => "process memory".into(),
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
        Backend::Memory => {
            // The store is shared per name; the prefix is a layer of paths
            // inside it, handled by `OpendalFs` (the memory service's own
            // root would give each prefix a separate map).
            return memory_store(&t.bucket);
        }
        Backend::Local => Operator::from_iter::<opendal::services::Fs>(cfg),
        #[cfg(feature = "s3")]
        Backend::S3 => Operator::from_iter::<opendal::services::S3>(cfg),
        #[cfg(feature = "gcs")]
        Backend::Gcs => Operator::from_iter::<opendal::services::Gcs>(cfg),
        #[cfg(feature = "azblob")]
        Backend::Azblob => Operator::from_iter::<opendal::services::Azblob>(cfg),
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
        assert_eq!(t.scheme, Backend::S3);
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
        assert_eq!((t.scheme, t.prefix.as_str()), (Backend::Local, "/tmp/x"));
        let t = parse_url("memory://m/p").unwrap();
        assert_eq!((t.scheme, t.bucket.as_str()), (Backend::Memory, "m"));
        assert_eq!(
            parse_url("ftp://x/y").unwrap_err().kind(),
            dcp_core::ErrorKind::InvalidInput
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
    fn unknown_storage_options_are_refused() {
        let opts =
            |k: &str| -> HashMap<String, String> { [(k.to_string(), "1".to_string())].into() };
        let t = parse_url("memory://m/p").unwrap();
        check_keys(&t, &opts("dcp_part_size")).unwrap();
        let e = check_keys(&t, &opts("foo")).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        assert!(
            e.message()
                .starts_with("unknown storage option \"foo\" for memory://m/p; accepted: "),
            "{e}"
        );
        assert!(e.message().contains("dcp_read_chunk"), "{e}");
        // file:// takes the dcp keys only: dcp sets the fs service's root.
        let t = parse_url("file:///tmp/x").unwrap();
        let e = check_keys(&t, &opts("root")).unwrap_err();
        assert!(
            e.message().contains("unknown storage option \"root\""),
            "{e}"
        );
        check_keys(&t, &opts("dcp_timeout_ms")).unwrap();
    }

    #[cfg(feature = "s3")]
    #[test]
    fn s3_storage_options() {
        let t = parse_url("s3://b/p").unwrap();
        let keys = accepted_keys(Backend::S3);
        // dcp's own keys, s3fs spellings, OpenDAL's fields and their aliases.
        for k in [
            "dcp_part_size",
            "endpoint_url",
            "key",
            "endpoint",
            "access_key_id",
            "region",
            "role_arn",
            "enable_virtual_host_style",
            "aws_session_token",
        ] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
            check_keys(&t, &[(k.to_string(), "x".to_string())].into()).unwrap();
        }
        let e = check_keys(&t, &[("endpiont".to_string(), "x".to_string())].into()).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        let m = e.message();
        assert!(
            m.starts_with("unknown storage option \"endpiont\" for s3://b/p; accepted: "),
            "{m}"
        );
        assert!(
            m.contains("endpoint_url") && m.contains("secret_access_key"),
            "{m}"
        );
        for k in ["bucket", "root", "aws_bucket"] {
            let e = check_keys(&t, &[(k.to_string(), "x".to_string())].into()).unwrap_err();
            assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
            assert!(e.message().contains("the URL sets it"), "{e}");
        }
    }

    #[cfg(feature = "gcs")]
    #[test]
    fn gcs_storage_options() {
        let keys = accepted_keys(Backend::Gcs);
        for k in ["credential", "credential_path", "endpoint", "dcp_part_size"] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
        }
        assert!(!keys.contains(&"bucket") && !keys.contains(&"access_key_id"));
    }

    #[cfg(feature = "azblob")]
    #[test]
    fn azblob_storage_options() {
        let keys = accepted_keys(Backend::Azblob);
        for k in ["account_name", "account_key", "sas_token", "endpoint"] {
            assert!(keys.contains(&k), "{k}: {keys:?}");
        }
        assert!(!keys.contains(&"container") && !keys.contains(&"root"));
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
