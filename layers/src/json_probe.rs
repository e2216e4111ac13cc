//! Reads `model` and `stream` from a request's JSON object, checking every other value and
//! skipping it without building anything.
//!
//! It replaces a `serde_json` deserialization of a derived struct whose other fields were skipped
//! as `IgnoredAny`, which cost about 2,500 instructions for a short chat request: every key
//! parsed into a string, and a scratch stack allocated and freed for any value nested two
//! levels deep (`"messages": [{...}]`). It accepts and rejects what that did, and reads the same
//! values (tested against it on generated bodies below): RFC 8259 syntax, control characters
//! refused in strings, escapes checked in skipped strings and decoded in keys and in `model`
//! (where an unpaired surrogate is an error), `model` a string or null, `stream` a boolean or
//! null, each of them at most once, and nothing but whitespace after the object. The caller
//! has already checked that the body is UTF-8.

use std::borrow::Cow;
use std::fmt;

/// What the probe read.
#[derive(Debug, Default)]
pub(crate) struct Probe<'a> {
    /// `model`, when present and not null.
    pub(crate) model: Option<Cow<'a, str>>,
    /// `stream`, when present and not null.
    pub(crate) stream: Option<bool>,
}

/// Why a body is not a JSON object the probe can read.
#[derive(Debug)]
pub(crate) struct ProbeError {
    what: &'static str,
    at: usize,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// Reads `text`, a JSON object.
pub(crate) fn probe(text: &str) -> Result<Probe<'_>, ProbeError> {
    let mut scanner = Scanner { text, at: 0 };
    scanner.object()
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn fail<T>(&self, what: &'static str) -> Result<T, ProbeError> {
        Err(ProbeError { what, at: self.at })
    }

    fn eat(&mut self, byte: u8, what: &'static str) -> Result<(), ProbeError> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            self.fail(what)
        }
    }

    fn object(&mut self) -> Result<Probe<'a>, ProbeError> {
        let mut probe = Probe::default();
        let (mut seen_model, mut seen_stream) = (false, false);
        self.skip_whitespace();
        self.eat(b'{', "expected an object")?;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
        } else {
            loop {
                self.skip_whitespace();
                self.eat(b'"', "expected a key")?;
                let key = self.string()?;
                self.skip_whitespace();
                self.eat(b':', "expected `:`")?;
                self.skip_whitespace();
                match &*key {
                    "model" => {
                        if std::mem::replace(&mut seen_model, true) {
                            return self.fail("duplicate field `model`");
                        }
                        probe.model = self.model()?;
                    }
                    "stream" => {
                        if std::mem::replace(&mut seen_stream, true) {
                            return self.fail("duplicate field `stream`");
                        }
                        probe.stream = self.stream()?;
                    }
                    _ => self.skip_value()?,
                }
                self.skip_whitespace();
                match self.peek() {
                    Some(b',') => self.at += 1,
                    Some(b'}') => {
                        self.at += 1;
                        break;
                    }
                    _ => return self.fail("expected `,` or `}`"),
                }
            }
        }
        self.skip_whitespace();
        if self.at != self.text.len() {
            return self.fail("trailing characters");
        }
        Ok(probe)
    }

    fn model(&mut self) -> Result<Option<Cow<'a, str>>, ProbeError> {
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                self.string().map(Some)
            }
            Some(b'n') => self.literal("null").map(|()| None),
            _ => self.fail("`model` must be a string or null"),
        }
    }

    fn stream(&mut self) -> Result<Option<bool>, ProbeError> {
        match self.peek() {
            Some(b't') => self.literal("true").map(|()| Some(true)),
            Some(b'f') => self.literal("false").map(|()| Some(false)),
            Some(b'n') => self.literal("null").map(|()| None),
            _ => self.fail("`stream` must be a boolean or null"),
        }
    }

    fn literal(&mut self, word: &'static str) -> Result<(), ProbeError> {
        if self.text.as_bytes()[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(())
        } else {
            self.fail("expected a value")
        }
    }

    /// The string whose opening quote was just read, decoded: borrowed when it has no escape.
    fn string(&mut self) -> Result<Cow<'a, str>, ProbeError> {
        let start = self.at;
        if self.plain_run()? == b'"' {
            let text = &self.text[start..self.at];
            self.at += 1;
            return Ok(Cow::Borrowed(text));
        }
        let mut decoded = String::from(&self.text[start..self.at]);
        loop {
            decoded.push(self.escape()?);
            let run = self.at;
            let end = self.plain_run()?;
            decoded.push_str(&self.text[run..self.at]);
            if end == b'"' {
                self.at += 1;
                return Ok(Cow::Owned(decoded));
            }
        }
    }

    /// Past the string whose opening quote was just read, its escapes checked.
    fn skip_string(&mut self) -> Result<(), ProbeError> {
        loop {
            if self.plain_run()? == b'"' {
                self.at += 1;
                return Ok(());
            }
            self.at += 1;
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.at += 1,
                Some(b'u') => {
                    self.at += 1;
                    self.hex4()?;
                }
                _ => return self.fail("invalid escape"),
            }
        }
    }

    /// Moves to the string's next quote or backslash, refusing control characters and the
    /// body's end: eight bytes at a time.
    fn plain_run(&mut self) -> Result<u8, ProbeError> {
        let bytes = self.text.as_bytes();
        loop {
            let rest = bytes.get(self.at..).unwrap_or_default();
            let (chunk, len) = match rest.first_chunk::<8>() {
                Some(chunk) => (*chunk, 8),
                None if rest.is_empty() => return self.fail("unterminated string"),
                None => {
                    // The body's last bytes, padded with bytes that are none of those.
                    let mut chunk = [b'a'; 8];
                    chunk[..rest.len()].copy_from_slice(rest);
                    (chunk, rest.len())
                }
            };
            match first_string_special(u64::from_le_bytes(chunk)) {
                Some(offset) => {
                    self.at += offset;
                    break;
                }
                None => self.at += len,
            }
        }
        match bytes.get(self.at) {
            Some(&byte @ (b'"' | b'\\')) => Ok(byte),
            _ => self.fail("control character in a string"),
        }
    }

    /// At a backslash: the character it escapes, read past.
    fn escape(&mut self) -> Result<char, ProbeError> {
        self.at += 1;
        let escaped = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.at += 1;
                let unit = self.hex4()?;
                return self.code_point(unit);
            }
            _ => return self.fail("invalid escape"),
        };
        self.at += 1;
        Ok(escaped)
    }

    /// The character of a `\u` escape whose four digits were just read: a surrogate must be a
    /// leading one followed by a trailing one, as in UTF-16.
    fn code_point(&mut self, unit: u16) -> Result<char, ProbeError> {
        let mut trailing = None;
        if (0xD800..=0xDBFF).contains(&unit) && self.text.as_bytes()[self.at..].starts_with(b"\\u")
        {
            self.at += 2;
            trailing = Some(self.hex4()?);
        }
        match char::decode_utf16(std::iter::once(unit).chain(trailing)).next() {
            Some(Ok(decoded)) => Ok(decoded),
            _ => self.fail("unpaired surrogate in an escape"),
        }
    }

    fn hex4(&mut self) -> Result<u16, ProbeError> {
        let Some(digits) = self.text.as_bytes().get(self.at..self.at + 4) else {
            return self.fail("invalid escape");
        };
        let mut value = 0u16;
        for &digit in digits {
            let nibble = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                b'A'..=b'F' => digit - b'A' + 10,
                _ => return self.fail("invalid escape"),
            };
            value = value << 4 | u16::from(nibble);
        }
        self.at += 4;
        Ok(value)
    }

    fn skip_number(&mut self) -> Result<(), ProbeError> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            // One leading zero at most.
            Some(b'0') => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return self.fail("invalid number");
                }
            }
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return self.fail("invalid number"),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.skip_some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.skip_some_digits()?;
        }
        Ok(())
    }

    fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn skip_some_digits(&mut self) -> Result<(), ProbeError> {
        let start = self.at;
        self.skip_digits();
        if self.at == start {
            return self.fail("invalid number");
        }
        Ok(())
    }

    /// Past one value of any kind, checked. Iterative, so that nesting costs no stack.
    fn skip_value(&mut self) -> Result<(), ProbeError> {
        let mut open = Nesting::default();
        loop {
            self.skip_whitespace();
            match self.peek() {
                Some(b'{') => {
                    self.at += 1;
                    self.skip_whitespace();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                    } else {
                        open.push(Open::Object);
                        self.member_key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.at += 1;
                    self.skip_whitespace();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                    } else {
                        open.push(Open::Array);
                        continue;
                    }
                }
                Some(b'"') => {
                    self.at += 1;
                    self.skip_string()?;
                }
                Some(b't') => self.literal("true")?,
                Some(b'f') => self.literal("false")?,
                Some(b'n') => self.literal("null")?,
                Some(b'-' | b'0'..=b'9') => self.skip_number()?,
                _ => return self.fail("expected a value"),
            }
            // A value ended: close what ends with it, up to where another value follows.
            loop {
                let Some(innermost) = open.innermost() else {
                    return Ok(());
                };
                self.skip_whitespace();
                match (self.peek(), innermost) {
                    (Some(b','), Open::Object) => {
                        self.at += 1;
                        self.member_key()?;
                        break;
                    }
                    (Some(b','), Open::Array) => {
                        self.at += 1;
                        break;
                    }
                    (Some(b'}'), Open::Object) | (Some(b']'), Open::Array) => {
                        self.at += 1;
                        open.pop();
                    }
                    (_, Open::Object) => return self.fail("expected `,` or `}`"),
                    (_, Open::Array) => return self.fail("expected `,` or `]`"),
                }
            }
        }
    }

    /// Past a skipped object's key and its colon.
    fn member_key(&mut self) -> Result<(), ProbeError> {
        self.skip_whitespace();
        self.eat(b'"', "expected a key")?;
        self.skip_string()?;
        self.skip_whitespace();
        self.eat(b':', "expected `:`")
    }
}

/// Where the first of 8 bytes (little-endian) that is a quote, a backslash or a control
/// character (below 0x20) is, if any is.
fn first_string_special(chunk: u64) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `v` below `n` (n <= 128): a byte's subtraction borrows into
    // its high bit when it is below `n`, and `!v` keeps bytes of 128 and above out. A borrow
    // can mark bytes above a marked one too, never below: the lowest mark is exact.
    let below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v & HIGH;
    let quote = chunk ^ (ONES * u64::from(b'"'));
    let backslash = chunk ^ (ONES * u64::from(b'\\'));
    let marks = below(quote, 1) | below(backslash, 1) | below(chunk, 0x20);
    (marks != 0).then(|| marks.trailing_zeros() as usize / 8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Object,
    Array,
}

/// The arrays and objects a skipped value has open, innermost last: a bit each for the first
/// 128 levels, then a heap stack (JSON sets no limit, and the `serde_json` code this replaces
/// set none for skipped values).
#[derive(Default)]
struct Nesting {
    shallow: u128,
    depth: usize,
    deep: Vec<Open>,
}

impl Nesting {
    fn push(&mut self, open: Open) {
        if self.depth < 128 {
            let bit = 1u128 << self.depth;
            match open {
                Open::Object => self.shallow |= bit,
                Open::Array => self.shallow &= !bit,
            }
        } else {
            self.deep.push(open);
        }
        self.depth += 1;
    }

    fn innermost(&self) -> Option<Open> {
        match self.depth {
            0 => None,
            1..=128 => Some(if self.shallow >> (self.depth - 1) & 1 == 1 {
                Open::Object
            } else {
                Open::Array
            }),
            _ => self.deep.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 128 {
            self.deep.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the `serde_json` probe this module replaced read from `text`, `None` for a body
    /// it refused: the oracle the probe is held to.
    fn by_serde(text: &str) -> Option<(Option<String>, Option<bool>)> {
        #[derive(serde::Deserialize)]
        struct Probe<'a> {
            #[serde(borrow, default)]
            model: Option<Cow<'a, str>>,
            #[serde(default)]
            stream: Option<bool>,
        }
        // It was given objects only (a struct is filled from an array too).
        if !text
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('{')
        {
            return None;
        }
        let probe: Probe<'_> = serde_json::from_str(text).ok()?;
        Some((probe.model.map(Cow::into_owned), probe.stream))
    }

    fn by_probe(text: &str) -> Option<(Option<String>, Option<bool>)> {
        let probe = probe(text).ok()?;
        Some((probe.model.map(Cow::into_owned), probe.stream))
    }

    const SEEDS: &[&str] = &[
        r#"{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
        r#"{"model":"llama","stream":true,"n":{"deep":[1,2,{"x":[[],{}]}]},"t":-0.5e+3}"#,
        r#" { "stream" : false , "model" : "a\u002fb\n" , "s": "\ud83d\ude00 \" \\ \/ \b\f\r\t" } "#,
        r#"{"model":null,"stream":null,"x":[true,false,null,0,-0,1.5,2E9,3e-2,10]}"#,
        r#"{"mod\u0065l":"m","model2":"x","strea\u006d":true}"#,
        "{}",
        r#"{"a":{"b":{"c":{"d":[1,[2,[3]]]}}},"model":"long model name with spaces"}"#,
        "{\"model\":\"\u{e9}\u{65e5}\u{672c}\",\"k\":\"\u{fc} \u{1f600}\"}",
        "{\"messages\":[{\"content\":\"0123456789abcdef0123456789abcdef \\\" \\\\ end\"}]}",
    ];

    /// What mutations insert: JSON's punctuation, pieces of escapes, literals and keys.
    const PIECES: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        ":",
        ",",
        "\\",
        " ",
        "\n",
        "0",
        "1",
        "-",
        "+",
        ".",
        "e",
        "E",
        "u",
        "d8",
        "dc",
        "true",
        "null",
        "fals",
        "\"model\"",
        "\"stream\"",
        "\"model\":",
        "\\u",
        "\\ud83d",
        "\\udc00",
        "\\u00",
        "\u{e9}",
        "\u{1}",
        "\t",
        "\"x\":[",
        "{\"a\":",
    ];

    /// xorshift64*: a fixed sequence, so a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }
    }

    fn mutate(text: &str, rng: &mut Rng) -> String {
        let mut text = text.to_owned();
        for _ in 0..=rng.below(3) {
            let boundaries: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let at = boundaries[rng.below(boundaries.len())];
            match rng.below(3) {
                0 => text.insert_str(at, PIECES[rng.below(PIECES.len())]),
                1 if at < text.len() => {
                    text.remove(at);
                }
                _ if at < text.len() => {
                    text.remove(at);
                    text.insert_str(at, PIECES[rng.below(PIECES.len())]);
                }
                _ => {}
            }
        }
        text
    }

    #[test]
    fn reads_and_refuses_what_serde_json_did_on_generated_bodies() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut refused) = (0, 0);
        for seed in SEEDS {
            assert!(by_serde(seed).is_some(), "seed {seed:?}");
            assert_eq!(by_probe(seed), by_serde(seed), "{seed:?}");
            for _ in 0..4000 {
                let body = mutate(seed, &mut rng);
                let expected = by_serde(&body);
                assert_eq!(by_probe(&body), expected, "{body:?}");
                if expected.is_some() {
                    accepted += 1;
                } else {
                    refused += 1;
                }
            }
        }
        // Both kinds in numbers, or the comparison proves little.
        assert!(accepted > 3000 && refused > 3000, "{accepted} {refused}");
    }

    /// One of `choices`, mostly valid JSON and sometimes a near miss.
    fn pick<'c>(rng: &mut Rng, choices: &[&'c str]) -> &'c str {
        choices[rng.below(choices.len())]
    }

    fn whitespace(rng: &mut Rng) -> &'static str {
        pick(rng, &["", "", "", " ", "\n\t", "\r ", "\u{b}"])
    }

    fn random_string(rng: &mut Rng) -> String {
        let mut text = String::from("\"");
        for _ in 0..rng.below(5) {
            text.push_str(pick(
                rng,
                &[
                    "a",
                    "\u{e9}",
                    "\u{1f600}",
                    "\\n",
                    "\\\"",
                    "\\\\",
                    "\\/",
                    "\\b",
                    "\\u00e9",
                    "\\u0000",
                    "\\ud83d\\ude00",
                    "\\ud83d",
                    "\\udc00",
                    "\\ud83d\\u0041",
                    "\\ud83dx",
                    "\\uzz00",
                    "\\u12",
                    "\\q",
                    "\u{1f}",
                    "\u{10}",
                    "\u{7f}",
                    "\t",
                    "0123456789abcdef",
                    "lorem ipsum dolor ",
                ],
            ));
        }
        if rng.below(20) != 0 {
            text.push('"');
        }
        text
    }

    fn random_value(rng: &mut Rng, depth: usize) -> String {
        let kind = if depth > 3 {
            rng.below(3)
        } else {
            rng.below(5)
        };
        match kind {
            0 => random_string(rng),
            1 => pick(
                rng,
                &["true", "false", "null", "tru", "nul", "True", "nulll"],
            )
            .to_owned(),
            2 => format!(
                "{}{}{}{}",
                pick(rng, &["", "", "-", "+", "--"]),
                pick(rng, &["0", "7", "42", "00", "01", "", "-"]),
                pick(rng, &["", "", ".5", ".", ".05", "..5"]),
                pick(rng, &["", "", "e1", "E+2", "e-3", "e", "E+", "e1.5"])
            ),
            3 => {
                let mut text = String::from("[");
                let items = rng.below(4);
                for i in 0..items {
                    if i > 0 {
                        text.push_str(pick(rng, &[",", ",", ",", ", ", ",,", ""]));
                    }
                    text.push_str(whitespace(rng));
                    text.push_str(&random_value(rng, depth + 1));
                }
                if rng.below(15) == 0 {
                    text.push(',');
                }
                text.push_str(pick(rng, &["]", "]", "]", "]", "}", ""]));
                text
            }
            _ => {
                let mut text = String::from("{");
                let members = rng.below(4);
                for i in 0..members {
                    if i > 0 {
                        text.push_str(pick(rng, &[",", ",", ",", " , ", ",,", ""]));
                    }
                    text.push_str(whitespace(rng));
                    let key = if rng.below(10) == 0 {
                        random_string(rng)
                    } else {
                        "\"k\"".into()
                    };
                    text.push_str(&key);
                    text.push_str(pick(rng, &[":", ":", ":", " : ", "", "::"]));
                    text.push_str(&random_value(rng, depth + 1));
                }
                text.push_str(pick(rng, &["}", "}", "}", "}", "]", ""]));
                text
            }
        }
    }

    /// A request-like body: the probe's own fields among others, with values of any kind.
    fn random_body(rng: &mut Rng) -> String {
        let mut text = String::from(pick(rng, &["{", "{", "{", " {", "\n{", "[", ""]));
        let members = rng.below(5);
        for i in 0..members {
            if i > 0 {
                text.push_str(pick(rng, &[",", ",", ",", ",", ", ", ",,", ""]));
            }
            text.push_str(whitespace(rng));
            text.push_str(pick(
                rng,
                &[
                    "\"model\"",
                    "\"model\"",
                    "\"stream\"",
                    "\"stream\"",
                    "\"messages\"",
                    "\"mod\\u0065l\"",
                    "\"x\"",
                    "\"model \"",
                    "\"\\ud800\"",
                    "model",
                ],
            ));
            text.push_str(pick(rng, &[":", ":", ":", " :", ""]));
            text.push_str(whitespace(rng));
            text.push_str(&random_value(rng, 1));
        }
        text.push_str(whitespace(rng));
        text.push_str(pick(
            rng,
            &["}", "}", "}", "}", "} ", "}\n", "}x", "}}", ""],
        ));
        text
    }

    #[test]
    fn reads_and_refuses_what_serde_json_did_on_random_bodies() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..150_000 {
            let body = random_body(&mut rng);
            let expected = by_serde(&body);
            assert_eq!(by_probe(&body), expected, "{body:?}");
            if expected.is_some() {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            accepted > 10_000 && refused > 10_000,
            "{accepted} {refused}"
        );
    }

    #[test]
    fn reads_the_fields_and_decodes_their_escapes() {
        let probe = probe(SEEDS[2]).unwrap();
        assert_eq!(probe.model.as_deref(), Some("a/b\n"));
        assert_eq!(probe.stream, Some(false));
        let plain = super::probe(SEEDS[0]).unwrap();
        assert!(
            matches!(plain.model, Some(Cow::Borrowed("mock"))),
            "no copy"
        );
        assert_eq!(
            super::probe(r#"{"model":"\ud83d\ude00"}"#)
                .unwrap()
                .model
                .as_deref(),
            Some("\u{1f600}")
        );
    }

    #[test]
    fn nesting_deeper_than_the_bit_stack_is_skipped() {
        for depth in [127, 128, 129, 300] {
            let body = format!(
                r#"{{"x":{}1{},"model":"m"}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert_eq!(by_probe(&body), Some((Some("m".into()), None)), "{depth}");
            assert_eq!(by_serde(&body), by_probe(&body), "{depth}");
            let unbalanced = format!(
                r#"{{"x":{}1{}}}"#,
                "[{\"a\":".repeat(depth),
                "}]".repeat(depth - 1)
            );
            assert!(by_probe(&unbalanced).is_none(), "{depth}");
        }
    }

    #[test]
    fn errors_say_what_and_where() {
        let error = |text: &str| probe(text).unwrap_err().to_string();
        assert_eq!(
            error(r#"{"model":5}"#),
            "`model` must be a string or null at byte 9"
        );
        assert_eq!(
            error(r#"{"model":"a","model":"b"}"#),
            "duplicate field `model` at byte 21"
        );
        assert_eq!(error(r#"{"a":[1,]}"#), "expected a value at byte 8");
        assert_eq!(error("{} x"), "trailing characters at byte 3");
        assert_eq!(
            error("{\"a\":\"\u{1}\"}"),
            "control character in a string at byte 6"
        );
    }

    #[test]
    fn the_eight_byte_check_finds_the_first_special_byte() {
        for position in 0..8 {
            for special in [b'"', b'\\', 0x00, 0x1f] {
                let mut chunk = *b"abcdefgh";
                chunk[position] = special;
                let found = first_string_special(u64::from_le_bytes(chunk));
                assert_eq!(found, Some(position), "{special} at {position}");
                // A second one after it, and bytes that borrow, do not move it.
                for later in position + 1..8 {
                    let mut two = chunk;
                    two[later] = 0x00;
                    assert_eq!(
                        first_string_special(u64::from_le_bytes(two)),
                        Some(position)
                    );
                }
            }
        }
        for plain in [
            *b"abcdefgh",
            *b"        ",
            [0x20, 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']'],
            [0xa0, 0x9f, 0xc3, 0xa9, 0x21, 0x23, 0x5b, 0x5d],
        ] {
            assert_eq!(
                first_string_special(u64::from_le_bytes(plain)),
                None,
                "{plain:?}"
            );
        }
    }
}
