//! Record framing shared by the file store's files: `len: u32`, `crc: u32`, payload.
//!
//! `crc` is the CRC-32 (IEEE) of the four `len` bytes followed by the payload, so a
//! zero-filled tail (what some file systems show after a power cut) never checks out: the
//! CRC of four zero bytes is not zero. All integers are little-endian.

/// Bytes in front of every payload.
pub(crate) const HEADER: usize = 8;
/// Largest payload a frame may hold: a 1 MiB body plus its record fields, with room.
pub(crate) const MAX_PAYLOAD: usize = 2 << 20;

/// Appends one frame holding `payload` to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, payload: &[u8]) {
    // A payload is at most a 1 MiB body plus a few hundred bytes (the server's limit),
    // far below u32::MAX; saturating keeps a logic error from wrapping into a valid length.
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// What is at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next<'a> {
    /// A whole, checked frame: its payload and the bytes it took.
    Frame(&'a [u8], usize),
    /// Nothing left.
    End,
    /// A frame cut short by the end of the buffer (a torn write).
    Incomplete,
    /// A frame whose length or checksum is wrong.
    Corrupt,
}

/// Reads the frame at the start of `buf`.
pub(crate) fn decode(buf: &[u8]) -> Next<'_> {
    if buf.is_empty() {
        return Next::End;
    }
    let Some((len_bytes, rest)) = buf.split_first_chunk::<4>() else {
        return Next::Incomplete;
    };
    let Some((crc_bytes, rest)) = rest.split_first_chunk::<4>() else {
        return Next::Incomplete;
    };
    let len = u32::from_le_bytes(*len_bytes) as usize;
    if len == 0 || len > MAX_PAYLOAD {
        return Next::Corrupt;
    }
    let Some(payload) = rest.get(..len) else {
        return Next::Incomplete;
    };
    let mut h = crc32fast::Hasher::new();
    h.update(len_bytes);
    h.update(payload);
    if h.finalize() != u32::from_le_bytes(*crc_bytes) {
        return Next::Corrupt;
    }
    Next::Frame(payload, HEADER + len)
}

/// Little-endian field reader over a payload; every getter is `None` past the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    /// A string with a `u16` length in front.
    pub(crate) fn str16(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.bytes(n)?).ok()
    }
    /// A string with a `u8` length in front.
    pub(crate) fn str8(&mut self) -> Option<&'a str> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.bytes(n)?).ok()
    }
    pub(crate) fn rest(self) -> &'a [u8] {
        self.buf
    }
}

/// Appends a string with a `u16` length (strings here are host ids, at most 255 bytes).
pub(crate) fn put_str16(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

/// Appends a string with a `u8` length (key ids: 43 bytes).
pub(crate) fn put_str8(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u8::MAX as usize);
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_told_apart() {
        let mut buf = Vec::new();
        encode(&mut buf, b"hello");
        encode(&mut buf, b"world!");
        let Next::Frame(p, n) = decode(&buf) else {
            panic!()
        };
        assert_eq!((p, n), (&b"hello"[..], 13));
        assert_eq!(decode(&buf[n..]), Next::Frame(b"world!", 14));
        assert_eq!(decode(&buf[n + 14..]), Next::End);
        assert_eq!(decode(&buf[..n - 1]), Next::Incomplete);
        assert_eq!(decode(&buf[..3]), Next::Incomplete);
        assert_eq!(
            decode(&[0u8; 64]),
            Next::Corrupt,
            "zero fill is not a frame"
        );
        let mut bad = buf.clone();
        bad[10] ^= 1;
        assert_eq!(decode(&bad), Next::Corrupt);
        let mut bad = buf.clone();
        bad[0] = 6; // length changed: the checksum covers it
        assert_eq!(decode(&bad), Next::Corrupt);
    }

    #[test]
    fn reader_stops_at_the_end() {
        let mut out = vec![7u8];
        put_str16(&mut out, "host");
        put_str8(&mut out, "kid");
        out.extend_from_slice(&42u64.to_le_bytes());
        let mut r = Reader::new(&out);
        assert_eq!(r.u8(), Some(7));
        assert_eq!(r.str16(), Some("host"));
        assert_eq!(r.str8(), Some("kid"));
        assert_eq!(r.u64(), Some(42));
        assert_eq!(r.u8(), None);
    }
}
