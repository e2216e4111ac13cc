//! Request parsing: any bytes give `Ok` or an `InvalidRequest`, never a panic, and a parsed
//! model is exactly what the body names.
#![no_main]

use layers::{RequestInfo, RouterError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match RequestInfo::parse(data) {
        Ok(info) => {
            // A body that parsed is UTF-8 JSON; the model, if any, is a non-panicking string.
            assert!(std::str::from_utf8(data).is_ok());
            if let Some(model) = info.model {
                let _ = model.len();
            }
        }
        Err(RouterError::InvalidRequest(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
