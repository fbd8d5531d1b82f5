//! `dcp convert` with checkpoints on S3 (a moto server on 127.0.0.1,
//! dcp-testkit's `Moto`): export from a checkpoint on `s3://` to local
//! safetensors and to safetensors on `s3://`, import local safetensors
//! writing a checkpoint to `s3://`,
//! import safetensors read from `s3://` (a sharded directory, one file),
//! and dcp-to-dcp from one bucket prefix to another. Every safetensors file
//! equals, byte for byte, the export of the same demo checkpoint saved on
//! local disk.
#![cfg(feature = "object-store")]

use dcp_testkit::moto::Moto;
use std::path::Path;
use std::process::{Command, Output};

const SMALL: &[&str] = &["--layers", "2", "--hidden", "64", "--vocab", "96"];

fn dcp_s3(moto: &Moto, args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run dcp");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "dcp {args:?} failed: {err}");
    o
}

/// Every file of `dir` by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn convert_reads_and_writes_checkpoints_on_s3() {
    let Some(moto) = Moto::shared() else {
        return;
    };
    moto.create_bucket("convert-s3");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let demo = |dir: &str| {
        let mut a = vec!["demo", "--dir", dir, "--save-only", "--ranks", "3"];
        a.extend_from_slice(SMALL);
        dcp_s3(moto, &a);
    };
    // The same demo checkpoint locally (the reference) and on S3.
    demo(&format!("{d}/local-ck"));
    demo("s3://convert-s3/ck");
    let shard = ["--max-shard-size", "100KB"];

    let export = |src: &str, out: &str| {
        let mut a = vec!["convert", src, "--to-safetensors", out];
        a.extend_from_slice(&shard);
        let o = dcp_s3(moto, &a);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(s.starts_with(&format!("ok: {src} -> {out}")), "{s}");
    };
    export(&format!("{d}/local-ck"), &format!("{d}/reference"));
    let reference = files(&tmp.path().join("reference"));
    assert!(reference.len() > 3, "sharded with an index");
    assert!(reference
        .iter()
        .any(|(n, _)| n == "model.safetensors.index.json"));

    // Export from S3.
    export("s3://convert-s3/ck", &format!("{d}/from-s3"));
    assert_eq!(files(&tmp.path().join("from-s3")), reference);

    // Import writing to S3, 2 ranks split by columns, then export again.
    let o = dcp_s3(
        moto,
        &[
            "convert",
            &format!("{d}/from-s3"),
            "--to-dcp",
            "s3://convert-s3/imported",
            "--ranks",
            "2",
            "--shard",
            "col",
        ],
    );
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        s.contains("-> s3://convert-s3/imported: dcp checkpoint of 2 ranks"),
        "{s}"
    );
    let o = dcp_s3(moto, &["verify", "s3://convert-s3/imported"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: "));
    export("s3://convert-s3/imported", &format!("{d}/imported"));
    assert_eq!(files(&tmp.path().join("imported")), reference);

    // Safetensors read from S3 (the reference files uploaded): the
    // directory with its index, and one file by its URL.
    let port: u16 = moto.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    for (name, bytes) in &reference {
        let (status, body) =
            dcp_testkit::moto::http(port, "PUT", &format!("/convert-s3/hf/{name}"), bytes).unwrap();
        assert_eq!(status, 200, "upload {name}: {body}");
    }
    dcp_s3(
        moto,
        &[
            "convert",
            "s3://convert-s3/hf",
            "--to-dcp",
            "s3://convert-s3/from-hf",
            "--ranks",
            "3",
        ],
    );
    export("s3://convert-s3/from-hf", &format!("{d}/from-hf"));
    assert_eq!(files(&tmp.path().join("from-hf")), reference);
    let (first, _) = reference
        .iter()
        .find(|(n, _)| n.ends_with(".safetensors"))
        .unwrap();
    dcp_s3(
        moto,
        &[
            "convert",
            &format!("s3://convert-s3/hf/{first}"),
            "--to-dcp",
            &format!("{d}/one-shard"),
        ],
    );
    let o = dcp_s3(
        moto,
        &[
            "convert",
            &format!("{d}/one-shard"),
            "--to-safetensors",
            &format!("{d}/one.safetensors"),
        ],
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: "));
    let local = {
        let o = dcp_s3(
            moto,
            &[
                "convert",
                &format!("{d}/reference/{first}"),
                "--to-dcp",
                &format!("{d}/one-shard-local"),
            ],
        );
        assert!(o.status.success());
        dcp_s3(
            moto,
            &[
                "convert",
                &format!("{d}/one-shard-local"),
                "--to-safetensors",
                &format!("{d}/one-local.safetensors"),
            ],
        );
        std::fs::read(tmp.path().join("one-local.safetensors")).unwrap()
    };
    assert_eq!(
        std::fs::read(tmp.path().join("one.safetensors")).unwrap(),
        local
    );

    // Export to S3: a sharded prefix (imported back through its index and
    // exported locally: equal to the reference), one file by its URL, and
    // no overwrite.
    export("s3://convert-s3/ck", "s3://convert-s3/st");
    dcp_s3(
        moto,
        &[
            "convert",
            "s3://convert-s3/st",
            "--to-dcp",
            &format!("{d}/st-back"),
        ],
    );
    export(&format!("{d}/st-back"), &format!("{d}/st-back-st"));
    assert_eq!(files(&tmp.path().join("st-back-st")), reference);
    let again = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args([
            "convert",
            "s3://convert-s3/ck",
            "--to-safetensors",
            "s3://convert-s3/st",
        ])
        .args(shard)
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists; dcp convert does not overwrite"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    dcp_s3(
        moto,
        &[
            "convert",
            &format!("{d}/one-shard"),
            "--to-safetensors",
            "s3://convert-s3/single/one.safetensors",
        ],
    );
    dcp_s3(
        moto,
        &[
            "convert",
            "s3://convert-s3/single/one.safetensors",
            "--to-dcp",
            &format!("{d}/one-back"),
        ],
    );
    dcp_s3(
        moto,
        &[
            "convert",
            &format!("{d}/one-back"),
            "--to-safetensors",
            &format!("{d}/one-back.safetensors"),
        ],
    );
    assert_eq!(
        std::fs::read(tmp.path().join("one-back.safetensors")).unwrap(),
        local
    );

    // dcp to dcp, S3 to S3, resharded for 4 ranks.
    dcp_s3(
        moto,
        &[
            "convert",
            "s3://convert-s3/ck",
            "--to-dcp",
            "s3://convert-s3/resharded",
            "--ranks",
            "4",
        ],
    );
    export("s3://convert-s3/resharded", &format!("{d}/resharded"));
    assert_eq!(files(&tmp.path().join("resharded")), reference);
}
