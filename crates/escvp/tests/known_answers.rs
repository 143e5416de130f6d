//! Known-answer tests from the protocol reference, session transcripts, and properties.

use escvp::error::{DecodeError, InvalidKind};
use escvp::event::{Alarms, ImStatus, StatusReport, Warnings};
use escvp::net::{
    ExtHeader, HeaderId, HelloInfo, Info, Message, MessageType, Password, Status, Version,
};
use escvp::value::{LampHours, PowerCode, SourceCode, SourceList, WireValue};
use escvp::vp21::{Command, Reply, ReplyDecoder, Request, RequestDecoder, RequestLine};
use proptest::prelude::*;

fn roundtrip_message(bytes: &[u8]) -> Message {
    let (rest, msg) = Message::decode(bytes).expect("decodes");
    assert!(rest.is_empty());
    assert_eq!(msg.to_bytes(), bytes, "re-encodes to the same bytes");
    let (_, again) = Message::decode(&msg.to_bytes()).unwrap();
    assert_eq!(again, msg);
    msg
}

#[test]
fn connect_without_password() {
    let bytes = [
        0x45, 0x53, 0x43, 0x2F, 0x56, 0x50, 0x2E, 0x6E, 0x65, 0x74, 0x10, 0x03, 0x00, 0x00, 0x00,
        0x00,
    ];
    let msg = roundtrip_message(&bytes);
    assert_eq!(msg, Message::connect(None));
    assert_eq!(msg.kind(), MessageType::CONNECT);
    assert_eq!(msg.version(), Version::V1_0);
}

#[test]
fn ok_reply_and_every_status_code() {
    let msg = roundtrip_message(b"ESC/VP.net\x10\x03\x00\x00\x20\x00");
    assert_eq!(msg.status(), Status::OK);
    for (code, status, name) in [
        (0x00, Status::REQUEST, "REQUEST"),
        (0x20, Status::OK, "OK"),
        (0x40, Status::BAD_REQUEST, "BAD_REQUEST"),
        (0x41, Status::UNAUTHORIZED, "UNAUTHORIZED"),
        (0x43, Status::FORBIDDEN, "FORBIDDEN"),
        (0x45, Status::NOT_ALLOWED, "NOT_ALLOWED"),
        (0x53, Status::BUSY, "BUSY"),
        (0x55, Status::VERSION_NOT_SUPPORTED, "VERSION_NOT_SUPPORTED"),
    ] {
        let mut bytes = b"ESC/VP.net\x10\x03\x00\x00\x00\x00".to_vec();
        bytes[14] = code;
        let msg = roundtrip_message(&bytes);
        assert_eq!(msg.status(), status);
        assert_eq!(msg.status().name(), Some(name));
    }
    // The EH-QB1000 refusal from the reference, hex `4553432f56502e6e6574100300004500`.
    let msg = roundtrip_message(b"ESC/VP.net\x10\x03\x00\x00\x45\x00");
    assert_eq!(msg.status(), Status::NOT_ALLOWED);
}

#[test]
fn connect_with_password_is_34_bytes() {
    let pw = Password::new("admin").unwrap();
    let msg = Message::connect(Some(&pw));
    let bytes = msg.to_bytes();
    let mut expected = b"ESC/VP.net\x10\x03\x00\x00\x00\x01\x01\x01admin".to_vec();
    expected.resize(34, 0);
    assert_eq!(bytes, expected);
    let decoded = roundtrip_message(&bytes);
    let h = decoded.header(HeaderId::PASSWORD).unwrap();
    assert_eq!(h.attribute(), 1);
    assert_eq!(h.info().text(), b"admin");
    // Sixteen characters fit exactly; seventeen are refused, never a panic.
    assert!(Password::new("0123456789abcdef").is_ok());
    assert!(Password::new("0123456789abcdef0").is_err());
}

#[test]
fn six_header_password_vector() {
    // `ESC/VP.net\x10\x02\0\0\0\x06` + six 18-byte headers (the escvpnet crate's test shape).
    let mut bytes = b"ESC/VP.net\x10\x02\x00\x00\x00\x06".to_vec();
    for id in 0..6u8 {
        bytes.push(id);
        bytes.push(1);
        let mut info = format!("info{id}").into_bytes();
        info.resize(16, 0);
        bytes.extend_from_slice(&info);
    }
    assert_eq!(bytes.len(), 16 + 6 * 18);
    let msg = roundtrip_message(&bytes);
    assert_eq!(msg.kind(), MessageType::PASSWORD);
    assert_eq!(msg.headers().len(), 6);
    assert_eq!(msg.headers()[5].id(), HeaderId::COMMAND_TYPE);
    assert_eq!(msg.headers()[3].info().text(), b"info3");
    // The builder produces Password + New-Password.
    let old = Password::new("old").unwrap();
    let new = Password::new("new-one").unwrap();
    let req = Message::password_request(Some(&old), Some(Some(&new)));
    let req = roundtrip_message(&req.to_bytes());
    assert_eq!(req.headers().len(), 2);
    assert_eq!(
        req.header(HeaderId::NEW_PASSWORD).unwrap().info().text(),
        b"new-one"
    );
}

#[test]
fn hello_request_and_reply() {
    assert_eq!(
        Message::hello().to_bytes(),
        b"ESC/VP.net\x10\x01\x00\x00\x00\x00"
    );
    let reply = Message::hello_reply(Info::new(b"EBAF67AA").unwrap(), 56);
    let msg = roundtrip_message(&reply.to_bytes());
    assert_eq!(msg.encoded_len(), 16 + 3 * 18);
    let info = HelloInfo::from_reply(&msg).unwrap();
    assert_eq!(info.name.as_deref(), Some("EBAF67AA"));
    assert_eq!(info.im_type, Some(56));
    assert_eq!(info.command_type, Some(0x21));
    // Header order does not matter to the reader.
    let swapped = Message::new(
        MessageType::HELLO,
        Status::OK,
        vec![
            ExtHeader::new(HeaderId::COMMAND_TYPE, 0x21, Info::EMPTY),
            ExtHeader::new(HeaderId::PROJECTOR_NAME, 1, Info::new(b"X").unwrap()),
        ],
    )
    .unwrap();
    let info = HelloInfo::from_reply(&swapped).unwrap();
    assert_eq!(info.name.as_deref(), Some("X"));
    assert_eq!(info.im_type, None);
}

#[test]
fn imevent_and_pwstatus_samples() {
    let (rest, r) = Reply::decode(b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:").unwrap();
    assert!(rest.is_empty());
    let Reply::Event(ev) = r else { panic!("{r:?}") };
    let report = ev.report().unwrap();
    assert_eq!(report.status, ImStatus::NORMAL);
    assert_eq!(report.warnings, Warnings::NO_SIGNAL);
    assert_eq!(report.alarms, Alarms::NONE);
    assert_eq!(r.to_bytes(), b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:");
    let p = StatusReport::parse_pwstatus("01 00000000 00000000 T1 F1").unwrap();
    assert_eq!(p.status, ImStatus::STANDBY);
    assert_eq!(
        p.status.to_power_code(),
        Some(PowerCode::STANDBY_NETWORK_ON)
    );
}

#[test]
fn the_fixed_16_byte_read_bug_does_not_apply() {
    // epson-projector 0.6.0 reads 16 bytes and desyncs on `SNO=X8JK0000001\r:` (17 bytes).
    let input = b"SNO=X8JK0000001\r:PWR=01\r:";
    let mut dec = ReplyDecoder::new();
    let (n, first) = dec.decode(input).unwrap().unwrap();
    assert_eq!(
        first,
        Reply::Value {
            key: "SNO",
            value: "X8JK0000001"
        }
    );
    let (m, second) = dec.decode(&input[n..]).unwrap().unwrap();
    assert_eq!(
        second,
        Reply::Value {
            key: "PWR",
            value: "01"
        }
    );
    assert_eq!(n + m, input.len());
}

#[test]
fn wrong_protocol_id_is_invalid_at_once() {
    assert_eq!(
        Message::decode(b"HTTP/1.1 200 OK\r\n"),
        Err(DecodeError::Invalid {
            offset: 0,
            kind: InvalidKind::ProtocolId
        })
    );
}

// ---- transcripts ------------------------------------------------------------------------

fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b'x' => {
                    out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
                    i += 2;
                }
                other => out.push(other),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn describe(r: &Reply<'_>) -> String {
    match r {
        Reply::Ack => "Ack".into(),
        Reply::Err => "Err".into(),
        Reply::Value { key, value } => format!("Value {key}={value}"),
        Reply::Lines(l) => format!(
            "Lines {}",
            l.iter()
                .map(|l| format!("{}={}", l.key, l.value))
                .collect::<Vec<_>>()
                .join("|")
        ),
        Reply::Event(e) => {
            let r = e.report().unwrap();
            format!(
                "Event status={:02X} warnings={:08X} alarms={:08X}",
                r.status.get(),
                r.warnings.bits(),
                r.alarms.bits()
            )
        }
    }
}

fn replay(name: &str, text: &str) {
    let mut server_bytes = Vec::new();
    let mut expected = Vec::new();
    let mut client_bytes = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("C: ") {
            client_bytes.extend_from_slice(c.as_bytes());
            client_bytes.push(b'\r');
        } else if let Some(s) = line.strip_prefix("S: ") {
            server_bytes.extend(unescape(s));
        } else if let Some(r) = line.strip_prefix("R: ") {
            expected.push(r.to_owned());
        }
    }
    // The client's commands decode on the projector side, one request per C: line.
    let mut req = RequestDecoder::new();
    let mut rest = &client_bytes[..];
    let mut commands = 0;
    while let Some((n, line)) = req.decode(rest).unwrap() {
        let RequestLine::Ok(r) = line else {
            panic!("{name}: bad command {line:?}")
        };
        // Re-encoding the owned command gives the same bytes.
        assert_eq!(r.to_command().unwrap().to_bytes(), rest[..n].to_vec());
        rest = &rest[n..];
        commands += 1;
    }
    assert_eq!(
        commands,
        text.lines().filter(|l| l.starts_with("C: ")).count()
    );
    // The projector's bytes, fed one byte at a time, decode to the expected items.
    let mut dec = ReplyDecoder::new();
    let mut got = Vec::new();
    let mut buf = Vec::new();
    for &b in &server_bytes {
        buf.push(b);
        while let Some((n, r)) = dec.decode(&buf).unwrap() {
            got.push(describe(&r));
            buf.drain(..n);
        }
    }
    assert!(buf.is_empty(), "{name}: leftover {buf:?}");
    assert_eq!(got, expected, "{name}");
}

#[test]
fn transcripts() {
    replay("power_cycle", include_str!("fixtures/power_cycle.txt"));
    replay("quirks", include_str!("fixtures/quirks.txt"));
}

// ---- properties ---------------------------------------------------------------------------

fn arb_message() -> impl Strategy<Value = Message> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec(
            (
                any::<u8>(),
                any::<u8>(),
                proptest::collection::vec(1u8..=255, 0..=16),
            ),
            0..6,
        ),
    )
        .prop_map(|(version, kind, status, headers)| {
            let headers = headers
                .into_iter()
                .map(|(id, attr, info)| {
                    ExtHeader::new(HeaderId::new(id), attr, Info::new(&info).unwrap())
                })
                .collect();
            Message::new(MessageType::new(kind), Status::new(status), headers)
                .unwrap()
                .with_version(Version::new(version))
        })
}

fn arb_reply_bytes() -> impl Strategy<Value = Vec<u8>> {
    let key = "[A-Z][A-Z0-9]{0,9}";
    let value = "[ -9;-~]{0,20}"; // printable, no colon at the start of a line issue
    prop_oneof![
        Just(b":".to_vec()),
        Just(b"\r:".to_vec()),
        Just(b"ERR\r:".to_vec()),
        (key, value).prop_map(|(k, v)| format!("{k}={v}\r:").into_bytes()),
        (0u8..=255, any::<u32>(), any::<u32>())
            .prop_map(
                |(s, w, a)| format!("IMEVENT=0001 {s:02X} {w:08X} {a:08X} T1 F1\r:").into_bytes()
            ),
        proptest::collection::vec((key, value), 2..4).prop_map(|lines| {
            let mut s = String::new();
            for (k, v) in lines {
                s.push_str(&format!("{k}={v}\r"));
            }
            s.push(':');
            s.into_bytes()
        }),
    ]
}

proptest! {
    #[test]
    fn message_roundtrip_and_prefixes(msg in arb_message()) {
        let bytes = msg.to_bytes();
        let (rest, back) = Message::decode(&bytes).unwrap();
        prop_assert!(rest.is_empty());
        prop_assert_eq!(&back, &msg);
        for cut in 0..bytes.len() {
            let is_incomplete = matches!(Message::decode(&bytes[..cut]), Err(DecodeError::Incomplete { .. }));
            prop_assert!(is_incomplete, "prefix {} not Incomplete", cut);
        }
    }

    #[test]
    fn reply_stream_roundtrip_split_anywhere(replies in proptest::collection::vec(arb_reply_bytes(), 1..8), split in any::<prop::sample::Index>()) {
        let stream: Vec<u8> = replies.concat();
        // One shot.
        let mut dec = ReplyDecoder::new();
        let mut rest = &stream[..];
        let mut one_shot = Vec::new();
        while let Some((n, r)) = dec.decode(rest).unwrap() {
            one_shot.push(r.to_bytes());
            rest = &rest[n..];
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(one_shot.len(), replies.len());
        // Re-encoding is canonical except that "\r:" acks become ":".
        for (got, sent) in one_shot.iter().zip(&replies) {
            if sent.as_slice() == b"\r:" { prop_assert_eq!(got.as_slice(), b":"); } else { prop_assert_eq!(got, sent); }
        }
        // Split in two at any point: the same replies.
        let at = split.index(stream.len() + 1);
        let mut dec = ReplyDecoder::new();
        let mut buf = stream[..at].to_vec();
        let mut split_result = Vec::new();
        let mut feed = |buf: &mut Vec<u8>, out: &mut Vec<Vec<u8>>| {
            while let Some((n, r)) = dec.decode(buf).unwrap() { out.push(r.to_bytes()); buf.drain(..n); }
        };
        feed(&mut buf, &mut split_result);
        buf.extend_from_slice(&stream[at..]);
        feed(&mut buf, &mut split_result);
        prop_assert_eq!(split_result, one_shot);
    }

    #[test]
    fn reply_prefix_is_need_more(reply in arb_reply_bytes()) {
        for cut in 0..reply.len() {
            // A strict prefix never yields a reply that differs from the full one, and is never invalid.
            let mut dec = ReplyDecoder::new();
            match dec.decode(&reply[..cut]) {
                Ok(None) => {}
                Ok(Some((n, r))) => {
                    // Only a leading ":" of a "\r:" ack... cannot happen; any early reply is a bug.
                    prop_assert!(false, "early reply {:?} after {} of {} bytes", r, n, reply.len());
                }
                Err(e) => prop_assert!(false, "prefix invalid: {e}"),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Message::decode(&bytes);
        let mut dec = ReplyDecoder::with_max_len(64);
        let mut rest = &bytes[..];
        while let Ok(Some((n, r))) = dec.decode(rest) { let _ = r.to_bytes(); rest = &rest[n..]; }
        let mut req = RequestDecoder::with_max_len(64);
        let mut rest = &bytes[..];
        while let Ok(Some((n, _))) = req.decode(rest) { rest = &rest[n..]; }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = StatusReport::parse_imevent(s);
            let _ = LampHours::parse_value(s);
            let _ = SourceList::parse_value(s);
        }
    }

    #[test]
    fn commands_roundtrip_through_the_projector_side(name in "[A-Z][A-Z0-9]{0,12}", param in proptest::option::of("[!-9;-~]([ -9;-~]{0,20}[!-9;-~])?")) {
        let cmd = match &param { Some(p) => Command::set(&name, p).unwrap(), None => Command::query(&name).unwrap() };
        let bytes = cmd.to_bytes();
        let (n, line) = RequestDecoder::new().decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(n, bytes.len());
        let expected = match &param { Some(p) => Request::Set(&name, p), None => Request::Query(&name) };
        prop_assert_eq!(line, RequestLine::Ok(expected));
    }

    #[test]
    fn codes_roundtrip(code in any::<u8>()) {
        let s = SourceCode::new(code);
        prop_assert_eq!(SourceCode::parse_value(&s.to_param()).unwrap(), s);
        let p = PowerCode::new(code);
        prop_assert_eq!(PowerCode::parse_value(&p.to_param()).unwrap(), p);
    }
}
