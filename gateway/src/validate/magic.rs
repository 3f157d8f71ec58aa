//! Content types and magic bytes: does a body start the way its declared
//! media type says it should?
//!
//! [`media_type`] normalises a `Content-Type` header value to its bare,
//! lower-cased `type/subtype`; [`check`] compares the first bytes of a body
//! with the signature of that media type. Only a fixed table of binary
//! formats is checked (images, audio, video, PDF); every other media type is
//! [`Magic::NotChecked`]. `check` never needs more than [`MAX_MAGIC`] bytes,
//! so a streaming caller can hold back at most that much before deciding.

pub use crate::syntax::media_type;

/// Outcome of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// The head carries the signature of the declared media type.
    Match,
    /// The head contradicts the declared media type.
    Mismatch,
    /// Everything seen so far is consistent with the signature, but more
    /// bytes are needed to decide (never more than [`MAX_MAGIC`] in all).
    NeedMore,
    /// No signature is known for this media type.
    NotChecked,
}

/// How many leading bytes [`check`] needs at most to answer something other
/// than [`Magic::NeedMore`] (RIFF containers: `RIFF` size `WEBP`/`WAVE`).
pub const MAX_MAGIC: usize = 12;

/// One signature byte: `head[i] & mask == value`. A mask of 0 matches any byte.
#[derive(Clone, Copy)]
struct Sig(u8, u8);

/// Exact byte.
const fn b(v: u8) -> Sig {
    Sig(0xFF, v)
}

/// Any byte.
const ANY: Sig = Sig(0, 0);

const PNG: &[Sig] = &[
    b(0x89),
    b(b'P'),
    b(b'N'),
    b(b'G'),
    b(0x0D),
    b(0x0A),
    b(0x1A),
    b(0x0A),
];
const JPEG: &[Sig] = &[b(0xFF), b(0xD8), b(0xFF)];
const GIF87: &[Sig] = &[b(b'G'), b(b'I'), b(b'F'), b(b'8'), b(b'7'), b(b'a')];
const GIF89: &[Sig] = &[b(b'G'), b(b'I'), b(b'F'), b(b'8'), b(b'9'), b(b'a')];
const WEBP: &[Sig] = &[
    b(b'R'),
    b(b'I'),
    b(b'F'),
    b(b'F'),
    ANY,
    ANY,
    ANY,
    ANY,
    b(b'W'),
    b(b'E'),
    b(b'B'),
    b(b'P'),
];
const BMP: &[Sig] = &[b(b'B'), b(b'M')];
const TIFF_LE: &[Sig] = &[b(b'I'), b(b'I'), b(b'*'), b(0)];
const TIFF_BE: &[Sig] = &[b(b'M'), b(b'M'), b(0), b(b'*')];
const WAV: &[Sig] = &[
    b(b'R'),
    b(b'I'),
    b(b'F'),
    b(b'F'),
    ANY,
    ANY,
    ANY,
    ANY,
    b(b'W'),
    b(b'A'),
    b(b'V'),
    b(b'E'),
];
const ID3: &[Sig] = &[b(b'I'), b(b'D'), b(b'3')];
/// MPEG audio frame sync: eleven set bits.
const MPEG_SYNC: &[Sig] = &[b(0xFF), Sig(0xE0, 0xE0)];
const FLAC: &[Sig] = &[b(b'f'), b(b'L'), b(b'a'), b(b'C')];
const OGG: &[Sig] = &[b(b'O'), b(b'g'), b(b'g'), b(b'S')];
const EBML: &[Sig] = &[b(0x1A), b(0x45), b(0xDF), b(0xA3)];
const FTYP: &[Sig] = &[ANY, ANY, ANY, ANY, b(b'f'), b(b't'), b(b'y'), b(b'p')];
const PDF: &[Sig] = &[b(b'%'), b(b'P'), b(b'D'), b(b'F'), b(b'-')];

/// The signatures (alternatives) of a media type, if it is one we check.
fn signatures(media: &str) -> Option<&'static [&'static [Sig]]> {
    const TABLE: &[(&str, &[&[Sig]])] = &[
        ("image/png", &[PNG]),
        ("image/jpeg", &[JPEG]),
        ("image/gif", &[GIF87, GIF89]),
        ("image/webp", &[WEBP]),
        ("image/bmp", &[BMP]),
        ("image/tiff", &[TIFF_LE, TIFF_BE]),
        ("audio/wav", &[WAV]),
        ("audio/x-wav", &[WAV]),
        ("audio/wave", &[WAV]),
        ("audio/mpeg", &[ID3, MPEG_SYNC]),
        ("audio/flac", &[FLAC]),
        ("audio/ogg", &[OGG]),
        ("video/ogg", &[OGG]),
        ("audio/webm", &[EBML]),
        ("video/webm", &[EBML]),
        ("video/mp4", &[FTYP]),
        ("audio/mp4", &[FTYP]),
        ("application/pdf", &[PDF]),
    ];
    TABLE
        .iter()
        .find(|(m, _)| m.eq_ignore_ascii_case(media))
        .map(|&(_, sigs)| sigs)
}

/// Compare `head` with one signature.
fn check_one(sig: &[Sig], head: &[u8]) -> Magic {
    for (s, &h) in sig.iter().zip(head) {
        if h & s.0 != s.1 {
            return Magic::Mismatch;
        }
    }
    if head.len() >= sig.len() {
        Magic::Match
    } else {
        Magic::NeedMore
    }
}

/// Check the first bytes of a body against the signature of its declared
/// media type (as returned by [`media_type`]; compared case-insensitively).
///
/// `head` may be the whole body or only its first bytes: when it is shorter
/// than the signature and consistent with it so far the answer is
/// [`Magic::NeedMore`] (so a body that ends there is a mismatch in effect);
/// when its bytes already contradict every alternative it is
/// [`Magic::Mismatch`]. Bytes past [`MAX_MAGIC`] are never looked at.
pub fn check(media: &str, head: &[u8]) -> Magic {
    let Some(sigs) = signatures(media) else {
        return Magic::NotChecked;
    };
    let mut need_more = false;
    for sig in sigs {
        match check_one(sig, head) {
            Magic::Match => return Magic::Match,
            Magic::NeedMore => need_more = true,
            _ => {}
        }
    }
    if need_more {
        Magic::NeedMore
    } else {
        Magic::Mismatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_parsing() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"application/json", Some("application/json")),
            (b"Application/JSON; charset=utf-8", Some("application/json")),
            (b"  image/PNG  ", Some("image/png")),
            (b"\timage/png\t;q=1", Some("image/png")),
            (b"audio/x-wav", Some("audio/x-wav")),
            (
                b"application/vnd.api+json;v=2",
                Some("application/vnd.api+json"),
            ),
            (b"text/plain;", Some("text/plain")),
            (
                b"multipart/form-data; boundary=\"a b\"",
                Some("multipart/form-data"),
            ),
            (b"", None),
            (b"   ", None),
            (b"json", None),
            (b"/json", None),
            (b"application/", None),
            (b"application/json/x", None),
            (b"appli cation/json", None),
            (b"application /json", None),
            (b"application/ json", None),
            (b"application/js\"on", None),
            (b"application/js(on)", None),
            (b"image/p\xC3\xA9ng", None),
            (b"; charset=utf-8", None),
            (b"image/png\x00", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                media_type(input).as_deref(),
                *want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn max_magic_covers_every_signature() {
        let media = [
            "image/png",
            "image/jpeg",
            "image/gif",
            "image/webp",
            "image/bmp",
            "image/tiff",
            "audio/wav",
            "audio/x-wav",
            "audio/wave",
            "audio/mpeg",
            "audio/flac",
            "audio/ogg",
            "video/ogg",
            "audio/webm",
            "video/webm",
            "video/mp4",
            "audio/mp4",
            "application/pdf",
        ];
        for m in media {
            let sigs = signatures(m).unwrap();
            assert!(sigs.iter().all(|s| s.len() <= MAX_MAGIC), "{m}");
        }
        assert_eq!(signatures("image/webp").unwrap()[0].len(), MAX_MAGIC);
    }

    use Magic::*;

    /// (media, head, expected)
    const CASES: &[(&str, &[u8], Magic)] = &[
        // image/png
        ("image/png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", Match),
        ("image/png", b"\x89PNG\r\n\x1a\n", Match),
        ("image/png", b"\x89PNG\r\n", NeedMore),
        ("image/png", b"", NeedMore),
        ("image/png", b"\x89PNG\n\r\x1a\n", Mismatch),
        ("image/png", b"GIF89a", Mismatch),
        ("image/png", b"\x89P", NeedMore),
        ("image/png", b"\x88", Mismatch),
        // image/jpeg
        ("image/jpeg", b"\xFF\xD8\xFF\xE0\0\x10JFIF", Match),
        ("image/jpeg", b"\xFF\xD8\xFF", Match),
        ("image/jpeg", b"\xFF\xD8", NeedMore),
        ("image/jpeg", b"\xFF\xD9\xFF", Mismatch),
        ("image/jpeg", b"\x89PNG", Mismatch),
        // image/gif
        ("image/gif", b"GIF87a\x01\0", Match),
        ("image/gif", b"GIF89a\x01\0", Match),
        ("image/gif", b"GIF8", NeedMore),
        ("image/gif", b"GIF89", NeedMore),
        ("image/gif", b"GIF88a", Mismatch),
        ("image/gif", b"GIF89b", Mismatch),
        ("image/gif", b"gif89a", Mismatch),
        // image/webp
        ("image/webp", b"RIFF\x24\0\0\0WEBPVP8 ", Match),
        ("image/webp", b"RIFF\x24\0\0\0WEB", NeedMore),
        ("image/webp", b"RIFF\x24\0", NeedMore),
        ("image/webp", b"RIFF\x24\0\0\0WAVEfmt ", Mismatch),
        ("image/webp", b"RIFX\x24\0\0\0WEBP", Mismatch),
        ("image/webp", b"RIFF\x24\0\0\0WA", Mismatch),
        // image/bmp
        ("image/bmp", b"BM\x36\0\0\0", Match),
        ("image/bmp", b"BM", Match),
        ("image/bmp", b"B", NeedMore),
        ("image/bmp", b"BA", Mismatch),
        ("image/bmp", b"MB", Mismatch),
        // image/tiff
        ("image/tiff", b"II*\0\x08\0\0\0", Match),
        ("image/tiff", b"MM\0*\0\0\0\x08", Match),
        ("image/tiff", b"II", NeedMore),
        ("image/tiff", b"MM\0", NeedMore),
        ("image/tiff", b"II\0*", Mismatch),
        ("image/tiff", b"MM*\0", Mismatch),
        ("image/tiff", b"IM", Mismatch),
        // audio/wav, audio/x-wav, audio/wave
        ("audio/wav", b"RIFF\x24\x08\0\0WAVEfmt ", Match),
        ("audio/x-wav", b"RIFF\x24\x08\0\0WAVE", Match),
        ("audio/wave", b"RIFF\x24\x08\0\0WAVE", Match),
        ("audio/wav", b"RIFF\x24\x08\0\0WA", NeedMore),
        ("audio/x-wav", b"RIF", NeedMore),
        ("audio/wave", b"RIFF", NeedMore),
        ("audio/wav", b"RIFF\x24\x08\0\0WEBP", Mismatch),
        ("audio/x-wav", b"OggS\0\x02", Mismatch),
        ("audio/wave", b"RIFX", Mismatch),
        // audio/mpeg
        ("audio/mpeg", b"ID3\x04\0\0\0\0\0\x21", Match),
        ("audio/mpeg", b"\xFF\xFB\x90\x64", Match),
        ("audio/mpeg", b"\xFF\xF3", Match),
        ("audio/mpeg", b"\xFF\xE0", Match),
        ("audio/mpeg", b"ID", NeedMore),
        ("audio/mpeg", b"\xFF", NeedMore),
        ("audio/mpeg", b"", NeedMore),
        ("audio/mpeg", b"\xFF\xD8", Mismatch),
        ("audio/mpeg", b"\xFE\xFB", Mismatch),
        ("audio/mpeg", b"ID4", Mismatch),
        ("audio/mpeg", b"fLaC", Mismatch),
        // audio/flac
        ("audio/flac", b"fLaC\0\0\0\x22", Match),
        ("audio/flac", b"fLa", NeedMore),
        ("audio/flac", b"FLAC", Mismatch),
        ("audio/flac", b"ID3", Mismatch),
        // audio/ogg, video/ogg
        ("audio/ogg", b"OggS\0\x02\0\0", Match),
        ("video/ogg", b"OggS", Match),
        ("audio/ogg", b"Og", NeedMore),
        ("video/ogg", b"O", NeedMore),
        ("audio/ogg", b"OggZ", Mismatch),
        ("video/ogg", b"\x1A\x45\xDF\xA3", Mismatch),
        // audio/webm, video/webm
        ("audio/webm", b"\x1A\x45\xDF\xA3\x9F\x42\x86\x81", Match),
        ("video/webm", b"\x1A\x45\xDF\xA3", Match),
        ("audio/webm", b"\x1A\x45", NeedMore),
        ("video/webm", b"\x1A\x45\xDF", NeedMore),
        ("audio/webm", b"\x1A\x45\xDF\xA4", Mismatch),
        ("video/webm", b"\0\0\0\x20ftyp", Mismatch),
        // video/mp4, audio/mp4
        ("video/mp4", b"\0\0\0\x20ftypisom\0\0\x02\0", Match),
        ("audio/mp4", b"\0\0\0\x1CftypM4A ", Match),
        ("video/mp4", b"\0\0\0\x20", NeedMore),
        ("audio/mp4", b"\0\0\0\x1Cfty", NeedMore),
        ("video/mp4", b"", NeedMore),
        ("video/mp4", b"\0\0\0\x20moov", Mismatch),
        ("audio/mp4", b"ID3\x04\0\0\0\0", Mismatch),
        ("video/mp4", b"\0\0\0\x20f", NeedMore),
        ("video/mp4", b"\0\0\0\x20x", Mismatch),
        // application/pdf
        ("application/pdf", b"%PDF-1.7\n", Match),
        ("application/pdf", b"%PDF-", Match),
        ("application/pdf", b"%PD", NeedMore),
        ("application/pdf", b"%PDF1.7", Mismatch),
        ("application/pdf", b"PK\x03\x04", Mismatch),
        // media types compared case-insensitively
        ("Image/PNG", b"\x89PNG\r\n\x1a\n", Match),
        ("AUDIO/MPEG", b"\x00", Mismatch),
        // not checked
        ("application/json", b"{}", NotChecked),
        ("application/octet-stream", b"\x89PNG\r\n\x1a\n", NotChecked),
        ("text/plain", b"", NotChecked),
        ("image/svg+xml", b"<svg", NotChecked),
        ("image/png; charset=x", b"\x89PNG\r\n\x1a\n", NotChecked),
        ("", b"", NotChecked),
    ];

    #[test]
    fn check_table() {
        for &(media, head, want) in CASES {
            assert_eq!(check(media, head), want, "{media} {head:02X?}");
        }
    }

    #[test]
    fn every_match_is_need_more_on_each_shorter_prefix() {
        for &(media, head, want) in CASES {
            if want != Match {
                continue;
            }
            let sig_len = signatures(media)
                .unwrap()
                .iter()
                .filter(|s| check_one(s, head) == Match)
                .map(|s| s.len())
                .min()
                .unwrap();
            for n in 0..sig_len {
                assert_eq!(
                    check(media, &head[..n]),
                    NeedMore,
                    "{media} prefix {n} of {head:02X?}"
                );
            }
        }
    }

    #[test]
    fn only_first_max_magic_bytes_matter() {
        let mut body = b"RIFF\x24\0\0\0WEBP".to_vec();
        body.extend(std::iter::repeat_n(0xAA, 1000));
        assert_eq!(check("image/webp", &body), Match);
        assert_eq!(check("image/webp", &body[..MAX_MAGIC]), Match);
    }
}
