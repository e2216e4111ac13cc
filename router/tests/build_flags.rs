//! The compiler-flag parsing router/build.rs labels PGO builds with (`--version`).

include!("../build_flags.rs");

fn encoded(args: &[&str]) -> String {
    args.join("\x1f")
}

#[test]
fn plain_builds_have_no_label() {
    assert_eq!(profile_guided(""), None);
    assert_eq!(profile_guided(&encoded(&["-Ctarget-cpu=native"])), None);
    assert_eq!(profile_guided(&encoded(&["-C", "opt-level=3"])), None);
    // A path that mentions a profile is not the flag.
    assert_eq!(
        profile_guided(&encoded(&["-Lnative=/tmp/profile-use"])),
        None
    );
}

#[test]
fn every_spelling_of_the_profile_flags_is_recognised() {
    let data = "profile-use=/tmp/merged.profdata";
    for args in [
        vec![format!("-C{data}")],
        vec!["-C".to_owned(), data.to_owned()],
        vec!["--codegen".to_owned(), data.to_owned()],
        vec![format!("--codegen={data}")],
        vec!["-Copt-level=3".to_owned(), format!("-C{data}")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(profile_guided(&encoded(&args)), Some("PGO"), "{args:?}");
    }
    assert_eq!(
        profile_guided(&encoded(&["-Cprofile-generate=/tmp/profiles"])),
        Some("PGO training")
    );
    assert_eq!(
        profile_guided(&encoded(&["-C", "profile-generate=/tmp/profiles"])),
        Some("PGO training")
    );
}

#[test]
fn a_trailing_dash_c_is_no_flag() {
    assert_eq!(profile_guided(&encoded(&["-C"])), None);
}
