/// `PGO` or `PGO training` when the compiler flags (cargo's `CARGO_ENCODED_RUSTFLAGS`: one
/// argument after another, separated by 0x1f) compile with a profile (`-Cprofile-use`) or to
/// record one (`-Cprofile-generate`); `None` for a plain build. Included by build.rs and by
/// its test.
fn profile_guided(encoded_flags: &str) -> Option<&'static str> {
    let mut args = encoded_flags.split('\x1f');
    let mut kind = None;
    while let Some(arg) = args.next() {
        // `-Cname=value`, `-C name=value`, `--codegen name=value`, `--codegen=name=value`.
        let option = match arg {
            "-C" | "--codegen" => args.next().unwrap_or_default(),
            _ => match arg.strip_prefix("--codegen=") {
                Some(option) => option,
                None => arg.strip_prefix("-C").unwrap_or_default(),
            },
        };
        if option.starts_with("profile-use") {
            kind = Some("PGO");
        } else if option.starts_with("profile-generate") {
            kind = Some("PGO training");
        }
    }
    kind
}
