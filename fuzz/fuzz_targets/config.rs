//! Config parsing: any text gives a config that validates or an error with a message, never a
//! panic; a config that parsed builds its stack and listener settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            let _ = config.stack();
            let _ = config.listen();
            let _ = config.client();
            let _ = config.node_specs();
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
