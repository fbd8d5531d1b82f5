//! The fake-gcs-server and Azurite launchers: they start, serve, check
//! (or do not check) credentials, and are gone once killed. Skipped with a
//! message when a server is not installed and `CI` is unset.

use dcp_testkit::azurite::{self, Azurite};
use dcp_testkit::gcs::FakeGcs;
use dcp_testkit::server;

#[test]
fn fake_gcs_server_starts_creates_buckets_and_stops() {
    let Some(gcs) = FakeGcs::start() else { return };
    gcs.create_bucket("kit-bucket");
    let (status, body) =
        server::request(gcs.port(), "GET", "/storage/v1/b/kit-bucket", &[], b"").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"name\":\"kit-bucket\""), "{body}");
    let (status, _) =
        server::request(gcs.port(), "GET", "/storage/v1/b/missing-bucket", &[], b"").unwrap();
    assert_eq!(status, 404);
    assert!(gcs.server.alive());
    gcs.kill();
    assert!(!gcs.server.alive(), "PID {} still runs", gcs.server.pid);
    assert!(server::request(gcs.port(), "GET", "/", &[], b"").is_err());
    gcs.kill();
}

#[test]
fn azurite_starts_checks_shared_keys_and_stops() {
    let Some(az) = Azurite::start() else { return };
    az.create_container("kit-container");
    // Listing the container's blobs, signed with the right key and a wrong one.
    let (status, body) = az
        .signed(
            "GET",
            "kit-container",
            "comp=list&restype=container",
            azurite::KEY,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let wrong = "d3Jvbmcga2V5IG9mIGFuIGFjY291bnQ=";
    let (status, body) = az
        .signed("GET", "kit-container", "comp=list&restype=container", wrong)
        .unwrap();
    assert_eq!(status, 403, "a wrong key was accepted: {body}");
    assert!(az.server.alive());
    az.kill();
    assert!(!az.server.alive(), "PID {} still runs", az.server.pid);
    az.kill();
}
