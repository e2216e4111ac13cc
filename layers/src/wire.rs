//! HTTP/1.1 wire details shared by the client and the server: lengths, chunk sizes, lines,
//! header tokens, and reads that keep exactly what came.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, InvalidHeaderName};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// Size of a read through the stack.
pub(crate) const LANDING_SIZE: usize = 8 * 1024;

/// Reads what the socket has through a stack buffer and appends exactly that to `buf`. Most
/// requests, answers and stream events are far smaller than a read: an allocation of their
/// size is cheaper than one of [`LANDING_SIZE`] (which glibc serves from outside its per-thread
/// cache), and what is made from it holds no unused room.
pub(crate) fn poll_read_landing(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut landing = [MaybeUninit::<u8>::uninit(); LANDING_SIZE];
    let mut read = ReadBuf::uninit(&mut landing);
    ready!(Pin::new(stream).poll_read(cx, &mut read))?;
    let filled = read.filled();
    if buf.is_empty() {
        *buf = BytesMut::from(filled);
    } else {
        buf.extend_from_slice(filled);
    }
    Poll::Ready(Ok(filled.len()))
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Whether the last transfer coding a `transfer-encoding` value lists is `chunked`. Empty list
/// elements (`chunked,`) are skipped, as RFC 9110 5.6.1 asks of a recipient.
pub(crate) fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty())
        .is_some_and(|last| last.eq_ignore_ascii_case(b"chunked"))
}

/// Whether a comma-separated header `name` lists `token` (case-insensitively), in a value of
/// visible ASCII.
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|value| value.to_str().is_ok() && lists_token(value.as_bytes(), token.as_bytes()))
}

/// Whether a comma-separated header value lists `token` (case-insensitively).
pub(crate) fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `content-length` value: decimal digits only, and no more than fit in 19 of them.
pub(crate) fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// The size in a chunk-size line: hex digits, then optional blanks and extensions (ignored).
pub(crate) fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return None;
    }
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let end = size
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    let size = &size[..end];
    let significant = &size[size.iter().position(|&b| b != b'0').unwrap_or(size.len())..];
    if size.is_empty() || significant.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for &b in size {
        n = n * 16 + u64::from((b as char).to_digit(16)?);
    }
    Some(n)
}

/// Where the line at the front of `buf` ends (the index of its CR LF).
pub(crate) fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A header name as it came on the wire. The ones most requests and answers carry are found
/// by their length and a comparison, case aside, with their lower-case spelling:
/// `HeaderName::from_bytes` lower-cases every name into a scratch buffer first.
pub(crate) fn header_name(bytes: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    let is = |lower: &[u8]| same_but_case(bytes, lower);
    let common = match bytes.len() {
        4 if is(b"host") => header::HOST,
        4 if is(b"date") => header::DATE,
        6 if is(b"accept") => header::ACCEPT,
        6 if is(b"server") => header::SERVER,
        6 if is(b"expect") => header::EXPECT,
        10 if is(b"connection") => header::CONNECTION,
        10 if is(b"user-agent") => header::USER_AGENT,
        12 if is(b"content-type") => header::CONTENT_TYPE,
        13 if is(b"authorization") => header::AUTHORIZATION,
        13 if is(b"cache-control") => header::CACHE_CONTROL,
        14 if is(b"content-length") => header::CONTENT_LENGTH,
        15 if is(b"accept-encoding") => header::ACCEPT_ENCODING,
        17 if is(b"transfer-encoding") => header::TRANSFER_ENCODING,
        _ => return HeaderName::from_bytes(bytes),
    };
    Ok(common)
}

/// Whether `bytes` spell `lower` (lower-case letters and dashes only) but for case. Setting bit
/// 0x20 lower-cases a letter and keeps a dash; of all other bytes only CR turns into one of
/// those (a dash), so CR is refused. Without a branch per byte, unlike `eq_ignore_ascii_case`.
fn same_but_case(bytes: &[u8], lower: &[u8]) -> bool {
    bytes.len() == lower.len()
        && bytes.iter().zip(lower).fold(0, |differ, (&byte, &want)| {
            differ | ((byte | 0x20) ^ want) | u8::from(byte == b'\r')
        }) == 0
}

/// What [`header_name`] finds without `HeaderName::from_bytes`.
#[cfg(test)]
const COMMON_NAMES: [HeaderName; 13] = [
    header::HOST,
    header::DATE,
    header::ACCEPT,
    header::SERVER,
    header::EXPECT,
    header::CONNECTION,
    header::USER_AGENT,
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    header::CACHE_CONTROL,
    header::CONTENT_LENGTH,
    header::ACCEPT_ENCODING,
    header::TRANSFER_ENCODING,
];

/// Whether `name` (lower case) is a framing header, which a server or client writes from the
/// body's framing rather than passes on: `connection`, `transfer-encoding`, `content-length`,
/// `keep-alive`.
pub(crate) fn is_framing_header(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"transfer-encoding" | b"content-length" | b"keep-alive"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_what_http_makes_of_them() {
        let mut names: Vec<Vec<u8>> = Vec::new();
        for name in &COMMON_NAMES {
            let lower = name.as_str().as_bytes().to_vec();
            let upper = lower.to_ascii_uppercase();
            // Capitalized per word, as curl and many clients send them.
            let mut title = lower.clone();
            let mut start = true;
            for byte in &mut title {
                if start {
                    byte.make_ascii_uppercase();
                }
                start = *byte == b'-';
            }
            names.extend([lower, upper, title]);
        }
        for other in [
            &b"x-request-id"[..],
            b"X-Mock-Node",
            b"hosts",
            b"hos",
            b"content-typ",
            b"",
            b"bad name",
            b"content-type\0",
            b"content\rtype",
            b"Content_Type",
            b"content-typ\xc5",
            b"d\xc3\xa4te",
        ] {
            names.push(other.to_vec());
        }
        for name in names {
            let ours = header_name(&name).map_err(|_| ());
            let http = HeaderName::from_bytes(&name).map_err(|_| ());
            assert_eq!(ours, http, "{:?}", String::from_utf8_lossy(&name));
        }
    }

    #[test]
    fn any_byte_in_place_of_a_common_names_byte_is_read_as_http_reads_it() {
        for name in &COMMON_NAMES {
            let lower = name.as_str().as_bytes();
            for at in 0..lower.len() {
                for byte in 0..=u8::MAX {
                    let mut changed = lower.to_vec();
                    changed[at] = byte;
                    let ours = header_name(&changed).map_err(|_| ());
                    let http = HeaderName::from_bytes(&changed).map_err(|_| ());
                    assert_eq!(ours, http, "{:?}", String::from_utf8_lossy(&changed));
                }
            }
        }
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"0;name=value"), Some(0));
        assert_eq!(parse_chunk_size(b"FF "), Some(255));
        assert_eq!(parse_chunk_size(b"a\t;x=\"y\""), Some(10));
        assert_eq!(parse_chunk_size(b"00000000000000000005"), Some(5));
        for bad in [&b""[..], b"g", b";x", b"1000000000000000", b" 5", b"5;x\ny"] {
            assert_eq!(parse_chunk_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lengths_are_plain_decimals() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"1234"), Some(1234));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1 ",
            b"0x10",
            b"12345678901234567890",
        ] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimals_are_written_in_full() {
        for n in [0, 7, 10, 1234, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }
}
