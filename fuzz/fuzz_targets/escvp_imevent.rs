//! IMEVENT / PWSTATUS values: parse, write back, parse again: equal; the written form is
//! canonical (writing it again gives the same text); an `IMEVENT=` line carrying the text
//! decodes through the reply decoder to an event with the same report.
#![no_main]
use escvp::event::StatusReport;
use escvp::vp21::Reply;
use libfuzzer_sys::fuzz_target;

fn parse(text: &str, imevent: bool) -> Result<StatusReport<'_>, escvp::ValueError> {
    if imevent {
        StatusReport::parse_imevent(text)
    } else {
        StatusReport::parse_pwstatus(text)
    }
}

fn check(text: &str, imevent: bool) {
    if let Ok(r) = parse(text, imevent) {
        let mut s = String::new();
        r.write_value(&mut s).unwrap();
        let again = parse(&s, imevent).expect("written value parses");
        assert_eq!(again, r);
        let mut s2 = String::new();
        again.write_value(&mut s2).unwrap();
        assert_eq!(s2, s, "the written form is canonical");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text, true);
    check(text, false);
    if !text.contains(['\r', '\n']) && text.len() < 1000 {
        let line = format!("IMEVENT={text}\r:");
        let (rest, reply) = Reply::decode(line.as_bytes()).expect("an IMEVENT line decodes");
        assert!(rest.is_empty());
        let Reply::Event(ev) = reply else {
            panic!("not an event: {reply:?}")
        };
        assert_eq!(ev.raw(), text);
        assert_eq!(ev.report(), StatusReport::parse_imevent(text));
        assert_eq!(reply.to_bytes(), line.as_bytes());
    }
});
