//! Locations through the facade: what each build opens, what it refuses and
//! how, and `memory://` round trips.

use dcp::{
    load, save, ChunkBox, DType, DestStateDict, ErrorKind, ReaderOptions, Single, StateDict,
    WriterOptions,
};
use std::collections::HashMap;

fn no_options() -> HashMap<String, String> {
    HashMap::new()
}

/// The error of opening `location`, which must fail.
fn open_err(location: &str) -> dcp::Error {
    match dcp::open(location, &no_options()) {
        Ok(fs) => panic!("{location} opened as {}", fs.location()),
        Err(e) => e,
    }
}

/// A location whose feature is off: `Unsupported`, naming the feature, from
/// `open`, `writer` and `reader` alike; and `validate_checkpoint_id` says no.
#[allow(dead_code)]
fn assert_needs_feature(location: &str, feature: &str) {
    let want = format!("enable the \"{feature}\" feature of the dcp crate");
    let errors = [
        open_err(location),
        dcp::writer(location, WriterOptions::default()).unwrap_err(),
        dcp::reader(location, ReaderOptions::default()).unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{location}: {e}");
        assert!(e.message().contains(&want), "{location}: {e}");
        assert!(e.message().starts_with(location), "{location}: {e}");
    }
    assert!(!dcp::validate_checkpoint_id(location));
}

#[cfg(not(feature = "s3"))]
#[test]
fn s3_needs_the_s3_feature() {
    assert_needs_feature("s3://bucket/ckpt", "s3");
    assert_needs_feature("s3a://bucket/ckpt", "s3");
}

#[cfg(not(feature = "gcs"))]
#[test]
fn gcs_needs_the_gcs_feature() {
    assert_needs_feature("gs://bucket/ckpt", "gcs");
    assert_needs_feature("gcs://bucket/ckpt", "gcs");
}

#[cfg(not(feature = "azblob"))]
#[test]
fn azure_needs_the_azblob_feature() {
    for scheme in ["azblob", "az", "azure", "abfs", "abfss"] {
        assert_needs_feature(&format!("{scheme}://container/ckpt"), "azblob");
    }
}

#[cfg(feature = "s3")]
#[test]
fn s3_opens_without_touching_the_network() {
    assert!(dcp::validate_checkpoint_id("s3://bucket/ckpt"));
    let fs = dcp::open("s3://bucket/ckpt/", &no_options()).unwrap();
    assert_eq!(fs.location(), "s3://bucket/ckpt");
    // Unknown storage options are refused, naming the key and the accepted.
    let so: HashMap<String, String> = [("endpoit".to_string(), "http://x".to_string())].into();
    let e = dcp::writer_with("s3://bucket/ckpt", &so, WriterOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(
        e.message()
            .starts_with("unknown storage option \"endpoit\" for s3://bucket/ckpt; accepted: "),
        "{e}"
    );
    assert!(e.message().contains("endpoint_url"), "{e}");
    let so: HashMap<String, String> = [("endpoint_url".to_string(), "http://x".to_string())].into();
    dcp::reader_with("s3://bucket/ckpt", &so, ReaderOptions::default()).unwrap();
}

#[test]
fn unknown_schemes_are_invalid_input() {
    for location in [
        "ftp://host/x",
        "http://host/x",
        "https://host/x",
        "hdfs://nn/x",
    ] {
        let e = open_err(location);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{location}: {e}");
        let scheme = location.split("://").next().unwrap();
        assert!(
            e.message()
                .contains(&format!("unknown location scheme {scheme}://")),
            "{e}"
        );
        assert!(
            e.message()
                .contains("accepted: a path, file://, memory://, s3://"),
            "{e}"
        );
        assert!(!dcp::validate_checkpoint_id(location));
        let e = dcp::reader(location, ReaderOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
    for location in ["", "file://relative/x", "s3:///no-bucket"] {
        assert_eq!(
            open_err(location).kind(),
            ErrorKind::InvalidInput,
            "{location:?}"
        );
    }
}

#[cfg(feature = "fs")]
#[test]
fn local_locations_take_no_storage_options() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    assert!(dcp::validate_checkpoint_id(dir));
    let fs = dcp::open(&format!("file://{dir}"), &no_options()).unwrap();
    assert_eq!(fs.location(), dir);
    let so: HashMap<String, String> = [("dcp_part_size".to_string(), "8MiB".to_string())].into();
    let e = dcp::open(dir, &so).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(
        e.message()
            .starts_with("unknown storage option \"dcp_part_size\""),
        "{e}"
    );
}

#[cfg(not(feature = "fs"))]
#[test]
fn local_paths_need_the_fs_feature() {
    assert_needs_feature("ckpt/step-1", "fs");
    assert_needs_feature("file:///tmp/ckpt", "fs");
}

/// Save through `dcp::writer` and load through `dcp::reader` on one
/// `memory://` location: the two open the same store.
#[test]
fn memory_round_trip() {
    let location = "memory://facade-test/step-7";
    assert!(dcp::validate_checkpoint_id(location));
    let data: Vec<u8> = (0..3 * 5 * 4).map(|i| (i * 7 + 1) as u8).collect();
    let mut sd = StateDict::new();
    sd.insert_full_tensor(
        "w",
        DType::F32,
        vec![3, 5],
        bytes::Bytes::from(data.clone()),
    )
    .unwrap();
    sd.insert_bytes("rng", b"state".to_vec(), false).unwrap();
    let writer = dcp::writer(location, WriterOptions::default()).unwrap();
    dcp::local::block_on(save(&sd, &writer, &Single))
        .unwrap()
        .unwrap();

    let mut dest = DestStateDict::new();
    dest.want_tensor(
        "w",
        DType::F32,
        vec![3, 5],
        vec![ChunkBox::new(vec![1, 0], vec![2, 5]).unwrap()],
    )
    .unwrap();
    dest.want_bytes("rng").unwrap();
    let reader = dcp::reader(location, ReaderOptions::default()).unwrap();
    let loaded = dcp::local::block_on(load(dest, &reader, &Single))
        .unwrap()
        .unwrap();
    assert_eq!(
        loaded.state_dict.tensor("w").unwrap().chunks[0].data,
        data[20..]
    );
    assert_eq!(loaded.state_dict.bytes("rng").unwrap(), b"state");

    // Another name is another store.
    let other = dcp::reader(
        "memory://facade-test-other/step-7",
        ReaderOptions::default(),
    )
    .unwrap();
    let mut dest = DestStateDict::new();
    dest.want_bytes("rng").unwrap();
    let e = dcp::local::block_on(load(dest, &other, &Single))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}
