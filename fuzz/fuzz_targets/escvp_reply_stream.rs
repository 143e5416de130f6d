//! ESC/VP21 reply stream: decoding one shot and byte by byte agree; every decoded reply
//! re-encodes to bytes that decode to the same reply. The projector-side request decoder
//! gets the same bytes.
#![no_main]
use escvp::vp21::{Reply, ReplyDecoder, RequestDecoder, RequestLine};
use libfuzzer_sys::fuzz_target;

fn all(data: &[u8], step: usize) -> (Vec<Vec<u8>>, bool) {
    let mut dec = ReplyDecoder::with_max_len(512);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&buf) {
                Ok(Some((n, r))) => {
                    out.push(r.to_bytes());
                    buf.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let (one, err1) = all(data, data.len());
    let (bytewise, err2) = all(data, 1);
    if !err1 && !err2 {
        assert_eq!(one, bytewise);
    }
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
