//! ESC/VP21 reply stream: decoding one shot and byte by byte agree (errors are recovered
//! from with `recover`, and the replies decoded around them agree too); every decoded reply
//! re-encodes to bytes that decode to the same reply. The projector-side request decoder
//! gets the same bytes.
#![no_main]
use escvp::vp21::{Reply, ReplyDecoder, RequestDecoder, RequestLine};
use libfuzzer_sys::fuzz_target;

fn all(data: &[u8], step: usize) -> (Vec<Vec<u8>>, bool) {
    let mut dec = ReplyDecoder::with_limits(128, 512);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut errors = false;
    for chunk in data.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&buf) {
                Ok(Some((n, r))) => {
                    assert!(n >= 1 && n <= buf.len());
                    let bytes = r.to_bytes();
                    // The canonical form is never longer than the reply as received.
                    assert!(bytes.len() <= 512);
                    out.push(bytes);
                    buf.drain(..n);
                }
                Ok(None) => {
                    // At most one reply's limit, plus (right after a recovery) the tail of the
                    // bad reply that arrived with it, which goes with the next reply.
                    assert!(buf.len() < 2 * 512 + step, "waiting with a full buffer");
                    break;
                }
                Err(e) => {
                    assert!(!e.is_incomplete());
                    errors = true;
                    let n = dec.recover(&buf);
                    assert!(n <= buf.len());
                    buf.drain(..n);
                }
            }
        }
    }
    (out, errors)
}

fuzz_target!(|data: &[u8]| {
    let (one, _) = all(data, data.len());
    let (bytewise, _) = all(data, 1);
    let (sevens, _) = all(data, 7);
    assert_eq!(one, bytewise);
    assert_eq!(one, sevens);
    for bytes in &one {
        let (rest, r) = Reply::decode(bytes).expect("re-encoded reply decodes");
        assert!(rest.is_empty());
        assert_eq!(&r.to_bytes(), bytes);
    }
    let mut req = RequestDecoder::with_max_len(256);
    let mut rest = data;
    while let Ok(Some((n, line))) = req.decode(rest) {
        if let RequestLine::Ok(r) = line {
            if let Ok(cmd) = r.to_command() {
                let bytes = cmd.to_bytes();
                let (m, again) = RequestDecoder::new().decode(&bytes).unwrap().unwrap();
                assert_eq!(m, bytes.len());
                assert_eq!(again, RequestLine::Ok(r));
            }
        }
        rest = &rest[n..];
    }
});
