//! The HTTP/1 server's request reader: any bytes give a request, "not yet", or the 400/431 the
//! connection would get; never a panic. A request read takes no more bytes than there are, and
//! its body is within the limit. The raw reader (`serve_raw_connection`'s) reads the same bytes
//! the same way.
#![no_main]

use http_body::Body;
use layers::ServerConfig;
use layers::server::{compare_readings, read_request_from};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = ServerConfig {
        max_header_bytes: 4096,
        max_body_bytes: 1024,
        ..ServerConfig::default()
    };
    match read_request_from(data, &config) {
        Ok(Some((request, used))) => {
            assert!(used <= data.len());
            if let Some(length) = request.body().size_hint().exact() {
                assert!(length <= 1024);
            }
        }
        Ok(None) => {}
        Err(error) => assert!(matches!(error.status().as_u16(), 400 | 431), "{error:?}"),
    }
    if let Err(difference) = compare_readings(data, &config) {
        panic!("{difference}");
    }
});
