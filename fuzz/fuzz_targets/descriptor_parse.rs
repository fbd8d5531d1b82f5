//! `Descriptor::parse` and `ExtensionRegistry::resolve` on arbitrary
//! strings: never panic; what parses prints back to a string that parses to
//! the same descriptor and keeps to the documented alphabet.
#![no_main]

use dcp_core::transform::Descriptor;
use dcp_core::ErrorKind;
use dcp_fuzz::registry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Descriptor::parse(s);
    match &parsed {
        Ok(d) => {
            assert!(!d.name.is_empty() && d.name.len() <= 256);
            assert!(d
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            let printed = d.to_string();
            assert_eq!(
                &Descriptor::parse(&printed).expect("printed form parses"),
                d
            );
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt),
    }
    let reg = registry();
    match reg.resolve(s) {
        Ok(ext) => {
            assert!(parsed.is_ok());
            let again = Descriptor::parse(&ext.descriptor()).expect("own descriptor parses");
            assert_eq!(again.name, parsed.unwrap().name);
        }
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported),
            "{e:?}"
        ),
    }
});
