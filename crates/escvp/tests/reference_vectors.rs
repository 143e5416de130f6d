//! Known-answer tests: byte vectors and tables from the protocol reference
//! (`shared/reference/escvp-protocol.md`, cited by section), each checked
//! decode → encode → decode.

use escvp::event::{Alarms, ImStatus, StatusReport, Warnings};
use escvp::net::{
    ATTR_NAME_ASCII, ATTR_PASSWORD_PLAIN, COMMAND_TYPE_ESCVP21, ExtHeader, HeaderId, HelloInfo,
    Info, Message, MessageType, Password, Status, Version,
};
use escvp::value::{
    ErrorCode, LampHours, Number, OnOff, Power, PowerCode, PowerCommand, PowerStatus, Property,
    Source, SourceCode, SourceList, Timing, WireValue,
};
use escvp::vp21::{Command, Reply, ReplyDecoder, Request, RequestDecoder, RequestLine};
use escvp::{DecodeError, InvalidKind};

/// Decodes one message, checks it re-encodes to the same bytes and decodes again equal.
fn net_round_trip(bytes: &[u8]) -> Message {
    let (rest, msg) = Message::decode(bytes).expect("decodes");
    assert!(rest.is_empty(), "one message, nothing left over");
    assert_eq!(msg.to_bytes(), bytes, "re-encodes byte for byte");
    let (_, again) = Message::decode(&msg.to_bytes()).expect("decodes again");
    assert_eq!(again, msg);
    msg
}

/// Decodes every reply of `bytes` with one decoder; each is re-encoded and decoded again.
fn replies(bytes: &[u8]) -> Vec<Reply<'_>> {
    let mut dec = ReplyDecoder::new();
    let mut rest = bytes;
    let mut out = Vec::new();
    while let Some((n, reply)) = dec.decode(rest).expect("valid replies") {
        let encoded = reply.to_bytes();
        let (tail, again) = Reply::decode(&encoded).expect("re-encoded reply decodes");
        assert!(tail.is_empty());
        assert_eq!(again, reply, "decode -> encode -> decode of {reply:?}");
        out.push(reply);
        rest = &rest[n..];
    }
    assert!(rest.is_empty(), "no bytes left over: {rest:?}");
    out
}

// §1.5: the 16-byte CONNECT without a password that almost every client sends.
#[test]
fn connect_without_password() {
    let bytes = [
        0x45, 0x53, 0x43, 0x2F, 0x56, 0x50, 0x2E, 0x6E, 0x65, 0x74, 0x10, 0x03, 0x00, 0x00, 0x00,
        0x00,
    ];
    let msg = net_round_trip(&bytes);
    assert_eq!(msg.version(), Version::V1_0);
    assert_eq!(msg.kind(), MessageType::CONNECT);
    assert_eq!(msg.status(), Status::REQUEST);
    assert!(msg.headers().is_empty());
    assert_eq!(Message::connect(None).to_bytes(), bytes);
}

// §1.5: the OK reply `… 10 03 00 00 20 00`.
#[test]
fn connect_ok_reply() {
    let bytes = b"ESC/VP.net\x10\x03\x00\x00\x20\x00";
    let msg = net_round_trip(bytes);
    assert_eq!(msg.status(), Status::OK);
    assert_eq!(msg.kind(), MessageType::CONNECT);
    assert_eq!(
        Message::reply_to(&Message::connect(None), Status::OK).to_bytes(),
        bytes
    );
}

// §1.3: every status code, with its name; unknown ones round-trip and print in hex.
#[test]
fn status_codes() {
    let table = [
        (0x00, Status::REQUEST, "REQUEST"),
        (0x20, Status::OK, "OK"),
        (0x40, Status::BAD_REQUEST, "BAD_REQUEST"),
        (0x41, Status::UNAUTHORIZED, "UNAUTHORIZED"),
        (0x43, Status::FORBIDDEN, "FORBIDDEN"),
        (0x45, Status::NOT_ALLOWED, "NOT_ALLOWED"),
        (0x53, Status::BUSY, "BUSY"),
        (0x55, Status::VERSION_NOT_SUPPORTED, "VERSION_NOT_SUPPORTED"),
    ];
    for (byte, status, name) in table {
        let mut bytes = b"ESC/VP.net\x10\x03\x00\x00".to_vec();
        bytes.extend_from_slice(&[byte, 0]);
        let msg = net_round_trip(&bytes);
        assert_eq!(msg.status(), status);
        assert_eq!(msg.status().get(), byte);
        assert_eq!(status.name(), Some(name));
        assert_eq!(format!("{status:?}"), format!("Status::{name}"));
    }
    // The EH-QB1000 refusal from the reference, hex `4553432f56502e6e6574100300004500`.
    let msg = net_round_trip(b"ESC/VP.net\x10\x03\x00\x00\x45\x00");
    assert_eq!(msg.status(), Status::NOT_ALLOWED);
    let msg = net_round_trip(b"ESC/VP.net\x10\x03\x00\x00\x99\x00");
    assert_eq!(msg.status(), Status::new(0x99));
    assert_eq!(msg.status().name(), None);
    assert_eq!(format!("{:?}", msg.status()), "Status(0x99)");
}

// §1.4/§1.5: the 34-byte CONNECT with a plain password: header N=1, then 01 01 <pw NUL-padded>.
#[test]
fn connect_with_password() {
    let pw = Password::new("secret").expect("valid password");
    let mut expected = b"ESC/VP.net\x10\x03\x00\x00\x00\x01\x01\x01secret".to_vec();
    expected.resize(34, 0);
    assert_eq!(Message::connect(Some(&pw)).to_bytes(), expected);
    let msg = net_round_trip(&expected);
    let h = msg.header(HeaderId::PASSWORD).expect("password header");
    assert_eq!(h.attribute(), ATTR_PASSWORD_PLAIN);
    assert_eq!(h.info().text(), b"secret");
    // The bug of the `escvpnet` crate (§1.4, panics on information shorter than 16 bytes)
    // and the 16-byte limit: a one-byte password works, a 17-byte one is a clear error.
    assert_eq!(
        Message::connect(Some(&Password::new("x").expect("valid"))).to_bytes()[18..20],
        *b"x\0"
    );
    assert!(Password::new("0123456789abcdef").is_ok());
    assert!(matches!(
        Password::new("0123456789abcdefg"),
        Err(escvp::ValueError::TooLong {
            len: 17,
            max: 16,
            ..
        })
    ));
}

// §4.3: the 6-header PASSWORD vector of the `escvpnet` crate's tests.
#[test]
fn six_header_password_vector() {
    let bytes: &[u8] = b"ESC/VP.net\x10\x02\0\0\0\x06\
        \0\x050123456789abcdef\
        \x01\x04123456789abcdef0\
        \x02\x0323456789abcdef01\
        \x03\x023456789abcdef012\
        \x04\x01456789abcdef0123\
        \x05\x0056789abcdef01234";
    assert_eq!(bytes.len(), 16 + 6 * 18);
    let msg = net_round_trip(bytes);
    assert_eq!(msg.kind(), MessageType::PASSWORD);
    let ids: Vec<_> = msg.headers().iter().map(|h| h.id()).collect();
    assert_eq!(
        ids,
        [
            HeaderId::NULL,
            HeaderId::PASSWORD,
            HeaderId::NEW_PASSWORD,
            HeaderId::PROJECTOR_NAME,
            HeaderId::IM_TYPE,
            HeaderId::COMMAND_TYPE
        ]
    );
    let attrs: Vec<_> = msg.headers().iter().map(|h| h.attribute()).collect();
    assert_eq!(attrs, [5, 4, 3, 2, 1, 0]);
    assert_eq!(msg.headers()[1].info().text(), b"123456789abcdef0");
    let built = Message::new(
        MessageType::PASSWORD,
        Status::REQUEST,
        msg.headers()
            .iter()
            .map(|h| ExtHeader::new(h.id(), h.attribute(), *h.info()))
            .collect(),
    )
    .expect("six headers");
    assert_eq!(built.to_bytes(), bytes);
}

// §1.4: the PASSWORD request builder sends the Password and New-Password headers.
#[test]
fn password_change_request() {
    let old = Password::new("old").expect("valid");
    let new = Password::new("new-one").expect("valid");
    let req = net_round_trip(&Message::password_request(Some(&old), Some(Some(&new))).to_bytes());
    assert_eq!(req.kind(), MessageType::PASSWORD);
    assert_eq!(req.headers().len(), 2);
    assert_eq!(
        req.header(HeaderId::PASSWORD).expect("old").info().text(),
        b"old"
    );
    assert_eq!(
        req.header(HeaderId::NEW_PASSWORD)
            .expect("new")
            .info()
            .text(),
        b"new-one"
    );
}

// §1.9: HELLO request and the 3-header HELLO reply (name, IM type, command type 0x21).
#[test]
fn hello_request_and_reply() {
    let request = net_round_trip(b"ESC/VP.net\x10\x01\x00\x00\x00\x00");
    assert_eq!(request, Message::hello());
    let mut reply = b"ESC/VP.net\x10\x01\x00\x00\x20\x03".to_vec();
    reply.extend_from_slice(b"\x03\x01EB-L1755U\0\0\0\0\0\0\0");
    reply.extend_from_slice(&[0x04, 56]);
    reply.extend_from_slice(&[0; 16]);
    reply.extend_from_slice(&[0x05, 0x21]);
    reply.extend_from_slice(&[0; 16]);
    assert_eq!(reply.len(), 16 + 3 * 18);
    let msg = net_round_trip(&reply);
    assert_eq!(
        Message::hello_reply(Info::new(b"EB-L1755U").expect("fits"), 56).to_bytes(),
        reply
    );
    let info = HelloInfo::from_reply(&msg).expect("an OK HELLO reply");
    assert_eq!(info.name.as_deref(), Some("EB-L1755U"));
    assert_eq!(info.im_type, Some(56));
    assert_eq!(info.command_type, Some(COMMAND_TYPE_ESCVP21));
    assert_eq!(
        msg.header(HeaderId::PROJECTOR_NAME).map(|h| h.attribute()),
        Some(ATTR_NAME_ASCII)
    );
    // The order of the headers does not matter for HelloInfo.
    let mut swapped = msg.headers().to_vec();
    swapped.reverse();
    let m2 = Message::new(MessageType::HELLO, Status::OK, swapped).expect("3 headers");
    assert_eq!(HelloInfo::from_reply(&m2), Some(info));
}

// §1.7: version 0x20 decodes and is reported, it is not refused by the codec.
#[test]
fn version_2_is_decoded_and_reported() {
    let msg = net_round_trip(b"ESC/VP.net\x20\x03\x00\x00\x41\x00");
    assert_eq!(msg.version(), Version::V2_0);
    assert_ne!(msg.version(), Version::V1_0);
    let other = net_round_trip(b"ESC/VP.net\x11\x03\x00\x00\x00\x00");
    assert_eq!(format!("{:?}", other.version()), "Version(0x11)");
}

#[test]
fn wrong_protocol_id_is_invalid_at_the_first_wrong_byte() {
    // Something else entirely (an HTTP server on the port) fails at the first byte.
    assert_eq!(
        Message::decode(b"HTTP/1.1 200 OK\r\n"),
        Err(DecodeError::Invalid {
            offset: 0,
            kind: InvalidKind::ProtocolId
        })
    );
    assert_eq!(
        Message::decode(b"ESC/VP.NET\x10\x03\x00\x00\x00\x00"),
        Err(DecodeError::Invalid {
            offset: 7,
            kind: InvalidKind::ProtocolId
        })
    );
    // A truncated but so far valid header needs exactly the missing bytes.
    assert_eq!(
        Message::decode(b"ESC/VP.net\x10\x03"),
        Err(DecodeError::Incomplete { needed: 4 })
    );
    assert_eq!(
        Message::decode(b"ESC/VP.net\x10\x03\x00\x00\x00\x01\x01"),
        Err(DecodeError::Incomplete { needed: 17 })
    );
}

// §1.10: the IMEVENT sample, decoded into status, warnings, alarms and the raw tail.
#[test]
fn imevent_sample() {
    let got = replies(b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:");
    let [Reply::Event(ev)] = got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(ev.raw(), "0001 03 00000002 00000000 T1 F1");
    let r = ev.report().expect("well-formed");
    assert_eq!(r.event_code, Some(0x0001));
    assert_eq!(r.status, ImStatus::NORMAL);
    // IMEVENT 03 is "normal", which is PWR? 01, not PWR? 03 (cool-down).
    assert_eq!(r.status.to_power_code(), Some(PowerCode::ON));
    assert_eq!(r.warnings, Warnings::NO_SIGNAL);
    assert_eq!(r.alarms, Alarms::NONE);
    assert_eq!(r.extra, "T1 F1");
    let mut s = String::new();
    r.write_value(&mut s).expect("writes");
    assert_eq!(s, ev.raw());
}

// §1.10: the IMEVENT status codes are not the PWR? codes.
#[test]
fn imevent_status_table() {
    let table = [
        (0x01, ImStatus::STANDBY, Some(PowerCode::STANDBY_NETWORK_ON)),
        (0x02, ImStatus::WARM_UP, Some(PowerCode::WARM_UP)),
        (0x03, ImStatus::NORMAL, Some(PowerCode::ON)),
        (0x04, ImStatus::COOL_DOWN, Some(PowerCode::COOL_DOWN)),
        (0xFF, ImStatus::ABNORMAL, None),
    ];
    for (code, status, pwr) in table {
        let text = format!("0001 {code:02X} 00000000 00000000 T1 F1");
        let r = StatusReport::parse_imevent(&text).expect("valid");
        assert_eq!(r.status, status);
        assert_eq!(r.status.to_power_code(), pwr);
        let mut back = String::new();
        r.write_value(&mut back).expect("writes");
        assert_eq!(back, text);
    }
    let all_warnings = StatusReport::parse_imevent("0001 03 0000005F 0000007F")
        .expect("valid")
        .warnings;
    assert_eq!(
        all_warnings.names().collect::<Vec<_>>(),
        [
            "LAMP_LIFE",
            "NO_SIGNAL",
            "UNSUPPORTED_SIGNAL",
            "AIR_FILTER",
            "HIGH_TEMPERATURE",
            "ASPECT_CHANGE"
        ]
    );
    let alarms = StatusReport::parse_imevent("0001 FF 00000000 0000007F")
        .expect("valid")
        .alarms;
    assert_eq!(alarms.names().count(), 7);
    assert_eq!(alarms.unknown_bits(), 0);
}

// §1.10: PWSTATUS? has the same format without the event code.
#[test]
fn pwstatus_reply() {
    let got = replies(b"PWSTATUS=01 00000000 00000000 T1 F1\r:");
    let [Reply::Value { key, value }] = got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(key, "PWSTATUS");
    let r = StatusReport::parse_pwstatus(value).expect("valid");
    assert_eq!(r.event_code, None);
    assert_eq!(r.status, ImStatus::STANDBY);
    assert!(r.warnings.is_empty() && r.alarms.is_empty());
    let p = PowerStatus::parse_value(value).expect("valid");
    assert_eq!(p.to_param(), value);
}

// §4.1 bug 2: `SNO=X8JK0000001\r:` (17 bytes) then `PWR=01\r:` in one buffer: two replies,
// nothing left behind.
#[test]
fn serial_then_power_in_one_buffer() {
    let got = replies(b"SNO=X8JK0000001\r:PWR=01\r:");
    assert_eq!(
        got,
        [
            Reply::Value {
                key: "SNO",
                value: "X8JK0000001"
            },
            Reply::Value {
                key: "PWR",
                value: "01"
            }
        ]
    );
}

// §1.10: an IMEVENT before the reply is its own item (pszafer's test queues exactly this).
#[test]
fn imevent_before_reply() {
    let got = replies(b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:PWR=01\r:");
    assert_eq!(got.len(), 2);
    assert!(got[0].is_event());
    assert_eq!(
        got[1],
        Reply::Value {
            key: "PWR",
            value: "01"
        }
    );
    assert_eq!(got[1].key(), Some("PWR"));
}

// §2.1: ack forms, ERR, `\r\n`, multi-line, and a colon inside a value.
#[test]
fn reply_shapes() {
    let got = replies(b":\r:ERR\r:PWR=01\r\n:\r\nSOURCE=30\r\n:LOCALTIME=12:30\r:");
    assert_eq!(
        got,
        [
            Reply::Ack,
            Reply::Ack,
            Reply::Err,
            Reply::Value {
                key: "PWR",
                value: "01"
            },
            Reply::Value {
                key: "SOURCE",
                value: "30"
            },
            Reply::Value {
                key: "LOCALTIME",
                value: "12:30"
            },
        ]
    );
    assert_eq!(Reply::Ack.to_bytes(), b":");
    assert_eq!(Reply::Err.to_bytes(), b"ERR\r:");
    let multi = b"R=126 126 126\rG=126 126 126\rB=126 126 126\r:";
    let got = replies(multi);
    let [Reply::Lines(lines)] = got[..] else {
        panic!("{got:?}")
    };
    let keys: Vec<_> = lines.iter().map(|l| (l.key, l.value)).collect();
    assert_eq!(
        keys,
        [
            ("R", "126 126 126"),
            ("G", "126 126 126"),
            ("B", "126 126 126")
        ]
    );
    assert_eq!(got[0].to_bytes(), multi);
}

// §2.2, §2.3, §2.4, §2.5: typed values from reply text, typed errors on bad text.
#[test]
fn typed_values() {
    for (text, code) in [
        ("00", PowerCode::STANDBY_NETWORK_OFF),
        ("01", PowerCode::ON),
        ("02", PowerCode::WARM_UP),
        ("03", PowerCode::COOL_DOWN),
        ("04", PowerCode::STANDBY_NETWORK_ON),
        ("05", PowerCode::ABNORMAL_STANDBY),
        ("07", PowerCode::WIRELESS_HD_STANDBY),
        ("09", PowerCode::AV_STANDBY),
    ] {
        assert_eq!(PowerCode::parse_value(text), Ok(code));
        assert_eq!(code.to_param(), text);
    }
    assert_eq!(format!("{:?}", PowerCode::new(6)), "PowerCode(0x06)");
    assert!(PowerCode::parse_value("1").is_err());
    assert!(PowerCode::parse_value("ON").is_err());

    let lamps = LampHours::parse_value("1633 1633").expect("valid");
    assert_eq!(lamps.hours(), [1633, 1633]);
    assert_eq!(lamps.to_param(), "1633 1633");
    assert_eq!(LampHours::parse_value("12").expect("valid").first(), 12);
    assert!(LampHours::parse_value("12 x").is_err());

    let list = SourceList::parse_value("30 HDMI1 A0 HDMI2").expect("valid");
    assert_eq!(
        list.entries(),
        [
            (SourceCode::HDMI1, "HDMI1".to_owned()),
            (SourceCode::HDMI2, "HDMI2".to_owned())
        ]
    );
    assert_eq!(list.to_param(), "30 HDMI1 A0 HDMI2");
    assert!(SourceList::parse_value("30 HDMI1 A0").is_err());
    assert!(SourceList::parse_value("ZZ HDMI1").is_err());

    for (text, name) in [
        ("00", "NONE"),
        ("01", "FAN"),
        ("03", "LAMP_AT_POWER_ON"),
        ("04", "HIGH_TEMPERATURE"),
        ("06", "LAMP"),
        ("07", "LAMP_COVER_OPEN"),
        ("0A", "AUTO_IRIS"),
        ("18", "I2C"),
        ("1F", "OTHER"),
        ("FF", "OTHER_FF"),
    ] {
        let code = ErrorCode::parse_value(text).expect("hex");
        assert_eq!(code.name(), Some(name));
        assert_eq!(code.to_param(), text);
    }
    // No code 02 or 05 exists (§2.4): they decode and print in hex.
    assert_eq!(format!("{:?}", ErrorCode::new(2)), "ErrorCode(0x02)");

    assert_eq!(OnOff::parse_value("ON"), Ok(OnOff::On));
    assert_eq!(OnOff::On.to_param(), "ON");
    assert!(OnOff::parse_value("MAYBE").is_err());
    assert_eq!(Number::parse_value("255"), Ok(Number(255)));
    assert_eq!(Number(255).to_param(), "255");
    assert!(Number::parse_value("99999999999").is_err());
}

// §2.1, §2.7: command bytes and their execution-time classes.
#[test]
fn commands_and_timing() {
    use std::time::Duration;
    assert_eq!(PowerCommand::On.command().to_bytes(), b"PWR ON\r");
    assert_eq!(PowerCommand::Off.command().to_bytes(), b"PWR OFF\r");
    assert_eq!(Power::query().to_bytes(), b"PWR?\r");
    assert_eq!(Command::Null.to_bytes(), b"\r");
    assert_eq!(
        Source::set(&SourceCode::HDMI2).expect("valid").to_bytes(),
        b"SOURCE A0\r"
    );
    let on = PowerCommand::On.command().timing();
    assert_eq!(on.reply_within, Duration::from_secs(100));
    let off = PowerCommand::Off.command().timing();
    assert_eq!(off.reply_within, Duration::from_secs(50));
    assert_eq!(off.quiet_after, Duration::from_secs(10));
    assert_eq!(
        Source::set(&SourceCode::HDMI1).expect("valid").timing(),
        Timing::SOURCE
    );
    assert_eq!(Timing::SOURCE.reply_within, Duration::from_secs(5));
    assert_eq!(Power::query().timing(), Timing::OTHER);
    assert_eq!(Timing::OTHER.reply_within, Duration::from_secs(3));
    // Raw commands are validated: no injection of a second command or a fake reply end.
    assert!(Command::set("PWR", "ON\rPWR OFF").is_err());
    assert!(Command::set("PWR", "ON\n").is_err());
    assert!(Command::set("NAME", "a:b").is_err());
    assert!(Command::query("PWR?").is_err());
    assert!(Command::query("PWR\r").is_err());
    assert!(Command::set("PWR", "é").is_err());
}

// §2.1 server side: the lines a client sends, `\r\n` tolerated.
#[test]
fn requests() {
    let input = b"PWR ON\rPWR?\r\r\r\nSOURCE A0\r\nbad:line\r";
    let mut dec = RequestDecoder::new();
    let mut rest = &input[..];
    let mut got = Vec::new();
    while let Some((n, line)) = dec.decode(rest).expect("within limits") {
        got.push(line);
        rest = &rest[n..];
    }
    assert_eq!(
        got,
        [
            RequestLine::Ok(Request::Set("PWR", "ON")),
            RequestLine::Ok(Request::Query("PWR")),
            RequestLine::Ok(Request::Null),
            RequestLine::Ok(Request::Null),
            RequestLine::Ok(Request::Set("SOURCE", "A0")),
            RequestLine::Malformed(b"bad:line"),
        ]
    );
    // Each request decodes back into the command that produces its bytes.
    for line in &got[..5] {
        let RequestLine::Ok(req) = line else {
            unreachable!()
        };
        let cmd = req.to_command().expect("valid command");
        let bytes = cmd.to_bytes();
        let (rest, again) = escvp::vp21::decode_request(&bytes).expect("decodes");
        assert!(rest.is_empty());
        assert_eq!(again, *line);
    }
}
