//! The projector HTTP interface's parsers (json_query reply bodies, `WWW-Authenticate` Digest
//! challenges, `Authorization` Digest credentials), fed bytes from the network. Invariants:
//! nothing panics; what parses writes back to a form that parses to the same value, and that
//! form is canonical (writing it again gives the same text); a reply's text stays within its
//! bound.
#![no_main]
use escvp::http::{Authorization, Challenge, JsonQueryReply, MAX_REPLY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(reply) = JsonQueryReply::parse(rest) {
                assert!(reply.reply().len() <= MAX_REPLY_LEN);
                let body = reply.to_json();
                let again = JsonQueryReply::parse(body.as_bytes()).expect("written body parses");
                assert_eq!(again, reply);
                assert_eq!(again.to_json(), body, "the written body is canonical");
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(challenges) = Challenge::parse_header(text) {
                for c in challenges {
                    let header = c.to_header();
                    let again = Challenge::parse_header(&header).expect("written header parses");
                    assert_eq!(again, [c.clone()], "{header}");
                    assert_eq!(again[0].to_header(), header, "the written header is canonical");
                }
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(auth) = Authorization::parse(text) {
                let header = auth.to_header();
                let again = Authorization::parse(&header).expect("written header parses");
                assert!(again == auth, "{header}");
                assert_eq!(again.to_header(), header, "the written header is canonical");
            }
        }
    }
});
