//! `Metadata::decode` on arbitrary bytes: never panics, never allocates
//! beyond the input; whatever it accepts re-encodes to an equal value.
#![no_main]

use dcp_core::Metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(md) = Metadata::decode(data) {
        let again = md
            .encode()
            .expect("decoded metadata validates, so it encodes");
        assert_eq!(Metadata::decode(&again).expect("round trip"), md);
    }
});
