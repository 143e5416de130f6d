//! IMEVENT / PWSTATUS values: parse, write back, parse again: equal.
#![no_main]
use escvp::event::StatusReport;
use libfuzzer_sys::fuzz_target;

fn check(text: &str, imevent: bool) {
    let parse = |t| {
        if imevent {
            StatusReport::parse_imevent(t)
        } else {
            StatusReport::parse_pwstatus(t)
        }
    };
    if let Ok(r) = parse(text) {
        let mut s = String::new();
        r.write_value(&mut s).unwrap();
        let again = if imevent {
            StatusReport::parse_imevent(&s)
        } else {
            StatusReport::parse_pwstatus(&s)
        }
        .expect("written value parses");
        assert_eq!(again.status, r.status);
        assert_eq!(again.warnings, r.warnings);
        assert_eq!(again.alarms, r.alarms);
        assert_eq!(again.event_code, r.event_code);
        assert_eq!(again.extra, r.extra);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text, true);
        check(text, false);
    }
});
