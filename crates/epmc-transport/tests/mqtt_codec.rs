//! MQTT packet codec properties: round trips, strict prefixes are incomplete, arbitrary
//! bytes never panic, the size limit holds both ways.

use bytes::Bytes;
use epmc_transport::mqtt::*;
use proptest::prelude::*;

fn topic() -> impl Strategy<Value = TopicName> {
    "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,4}".prop_map(|t| TopicName::new(t).unwrap())
}

fn filter() -> impl Strategy<Value = TopicFilter> {
    "([a-z0-9]{1,6}|\\+)(/([a-z0-9]{1,6}|\\+)){0,3}(/#)?".prop_map(|t| TopicFilter::new(t).unwrap())
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        (
            "[a-z0-9-]{0,36}",
            any::<bool>(),
            any::<u16>(),
            proptest::option::of((
                topic(),
                proptest::collection::vec(any::<u8>(), 0..20),
                qos(),
                any::<bool>()
            )),
            proptest::option::of("[a-z]{0,10}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
        )
            .prop_map(
                |(client_id, clean_session, keep_alive, will, username, password)| {
                    Packet::Connect(Connect {
                        client_id,
                        clean_session,
                        keep_alive,
                        will: will.map(|(topic, p, qos, retain)| Will {
                            topic,
                            payload: Bytes::from(p),
                            qos,
                            retain,
                        }),
                        username,
                        password: password.map(Bytes::from),
                    })
                }
            ),
        (any::<bool>(), 0u8..=6).prop_map(|(s, c)| Packet::ConnAck {
            session_present: s,
            code: match c {
                0 => ConnectReturn::Accepted,
                1 => ConnectReturn::BadProtocol,
                2 => ConnectReturn::IdentifierRejected,
                3 => ConnectReturn::ServerUnavailable,
                4 => ConnectReturn::BadCredentials,
                5 => ConnectReturn::NotAuthorized,
                _ => ConnectReturn::Other(77),
            }
        }),
        (
            topic(),
            qos(),
            1u16..,
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(
                |(topic, qos, id, retain, dup, payload)| Packet::Publish(Publish {
                    topic,
                    qos,
                    packet_id: (qos == QoS::AtLeastOnce).then_some(id),
                    retain,
                    dup: dup && qos == QoS::AtLeastOnce,
                    payload: Bytes::from(payload),
                })
            ),
        (1u16..).prop_map(Packet::PubAck),
        (1u16.., proptest::collection::vec((filter(), qos()), 1..4))
            .prop_map(|(id, f)| Packet::Subscribe(id, f)),
        (
            1u16..,
            proptest::collection::vec(proptest::option::of(qos()), 1..4)
        )
            .prop_map(|(id, c)| Packet::SubAck(id, c)),
        (1u16.., proptest::collection::vec(filter(), 1..4))
            .prop_map(|(id, f)| Packet::Unsubscribe(id, f)),
        (1u16..).prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

proptest! {
    #[test]
    fn round_trip_and_prefixes(p in packet()) {
        let bytes = p.to_bytes().unwrap();
        let (back, used) = Packet::decode(&bytes, DEFAULT_MAX_PACKET).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &p);
        for cut in 0..bytes.len() {
            let incomplete = matches!(Packet::decode(&bytes[..cut], DEFAULT_MAX_PACKET), Err(PacketError::Incomplete { .. }));
            prop_assert!(incomplete, "prefix {}", cut);
        }
        // A limit just below the size refuses it both ways.
        if bytes.len() > 2 {
            let is_too_large = matches!(Packet::decode(&bytes, bytes.len() - 1), Err(PacketError::TooLarge { .. }));
            prop_assert!(is_too_large);
            let enc_too_large = matches!(p.encode(&mut Vec::new(), bytes.len() - 1), Err(PacketError::TooLarge { .. }));
            prop_assert!(enc_too_large);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut rest = &bytes[..];
        while let Ok((p, n)) = Packet::decode(rest, 4096) {
            // Whatever decodes re-encodes and decodes to the same packet.
            let again = p.to_bytes().unwrap();
            prop_assert_eq!(Packet::decode(&again, 4096).unwrap().0, p);
            rest = &rest[n..];
        }
    }
}

// Differential checks against rumqttc's MQTT 3.1.1 codec (`rumqttc::mqttbytes::v4`, a
// dev-dependency only): the same packet must give the same bytes, and each side must decode
// what the other encodes.
mod oracle {
    use super::*;
    use rumqttc::mqttbytes::QoS as RqQoS;
    use rumqttc::mqttbytes::v4 as rq;

    fn qos(q: QoS) -> RqQoS {
        match q {
            QoS::AtMostOnce => RqQoS::AtMostOnce,
            QoS::AtLeastOnce => RqQoS::AtLeastOnce,
        }
    }

    /// Our packet as rumqttc's, or `None` where rumqttc cannot say the same thing (it only
    /// knows a login with a non-empty UTF-8 user name and password).
    pub fn theirs(p: &Packet) -> Option<rq::Packet> {
        Some(match p {
            Packet::Connect(c) => {
                let login = match (&c.username, &c.password) {
                    (None, None) => None,
                    (Some(u), Some(pw)) if !u.is_empty() && !pw.is_empty() => Some(rq::Login {
                        username: u.clone(),
                        password: String::from_utf8(pw.to_vec()).ok()?,
                    }),
                    _ => return None,
                };
                rq::Packet::Connect(rq::Connect {
                    protocol: rumqttc::mqttbytes::Protocol::V4,
                    keep_alive: c.keep_alive,
                    client_id: c.client_id.clone(),
                    clean_session: c.clean_session,
                    last_will: c.will.as_ref().map(|w| rq::LastWill {
                        topic: w.topic.as_str().to_owned(),
                        message: w.payload.clone(),
                        qos: qos(w.qos),
                        retain: w.retain,
                    }),
                    login,
                })
            }
            Packet::ConnAck {
                session_present,
                code,
            } => rq::Packet::ConnAck(rq::ConnAck {
                session_present: *session_present,
                code: match code {
                    ConnectReturn::Accepted => rq::ConnectReturnCode::Success,
                    ConnectReturn::BadProtocol => rq::ConnectReturnCode::RefusedProtocolVersion,
                    ConnectReturn::IdentifierRejected => rq::ConnectReturnCode::BadClientId,
                    ConnectReturn::ServerUnavailable => rq::ConnectReturnCode::ServiceUnavailable,
                    ConnectReturn::BadCredentials => rq::ConnectReturnCode::BadUserNamePassword,
                    ConnectReturn::NotAuthorized => rq::ConnectReturnCode::NotAuthorized,
                    ConnectReturn::Other(_) => return None,
                },
            }),
            Packet::Publish(p) => rq::Packet::Publish(rq::Publish {
                dup: p.dup,
                qos: qos(p.qos),
                retain: p.retain,
                topic: p.topic.as_str().to_owned(),
                pkid: p.packet_id.unwrap_or(0),
                payload: p.payload.clone(),
            }),
            Packet::PubAck(id) => rq::Packet::PubAck(rq::PubAck { pkid: *id }),
            Packet::Subscribe(id, filters) => rq::Packet::Subscribe(rq::Subscribe {
                pkid: *id,
                filters: filters
                    .iter()
                    .map(|(f, q)| rq::SubscribeFilter::new(f.as_str().to_owned(), qos(*q)))
                    .collect(),
            }),
            Packet::SubAck(id, codes) => rq::Packet::SubAck(rq::SubAck {
                pkid: *id,
                return_codes: codes
                    .iter()
                    .map(|c| match c {
                        Some(q) => rq::SubscribeReasonCode::Success(qos(*q)),
                        None => rq::SubscribeReasonCode::Failure,
                    })
                    .collect(),
            }),
            Packet::Unsubscribe(id, filters) => rq::Packet::Unsubscribe(rq::Unsubscribe {
                pkid: *id,
                topics: filters.iter().map(|f| f.as_str().to_owned()).collect(),
            }),
            Packet::UnsubAck(id) => rq::Packet::UnsubAck(rq::UnsubAck { pkid: *id }),
            Packet::PingReq => rq::Packet::PingReq,
            Packet::PingResp => rq::Packet::PingResp,
            Packet::Disconnect => rq::Packet::Disconnect,
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn same_bytes_as_rumqttc_and_each_decodes_the_other(p in packet()) {
        let Some(theirs) = oracle::theirs(&p) else {
            return Err(TestCaseError::reject("not expressible in rumqttc"));
        };
        let ours_bytes = p.to_bytes().unwrap();
        let mut their_bytes = bytes::BytesMut::new();
        theirs.write(&mut their_bytes, DEFAULT_MAX_PACKET).unwrap();
        prop_assert_eq!(&ours_bytes[..], &their_bytes[..], "encodings differ for {:?}", p);
        // rumqttc decodes ours ...
        let mut stream = bytes::BytesMut::from(&ours_bytes[..]);
        let decoded = rumqttc::mqttbytes::v4::Packet::read(&mut stream, DEFAULT_MAX_PACKET).unwrap();
        prop_assert_eq!(&decoded, &theirs);
        prop_assert!(stream.is_empty());
        // ... and we decode theirs.
        let (back, used) = Packet::decode(&their_bytes, DEFAULT_MAX_PACKET).unwrap();
        prop_assert_eq!(used, their_bytes.len());
        prop_assert_eq!(back, p);
    }

    /// A valid packet with one byte changed: where both codecs accept the bytes, they read
    /// the same packet, and we accept nothing rumqttc refuses except the two cases below.
    #[test]
    fn mutated_packets_read_the_same_where_both_accept(
        p in packet(), at in any::<prop::sample::Index>(), byte in any::<u8>()
    ) {
        let mut bytes = p.to_bytes().unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let mut stream = bytes::BytesMut::from(&bytes[..]);
        let theirs = rumqttc::mqttbytes::v4::Packet::read(&mut stream, 4096);
        let ours = Packet::decode(&bytes, 4096);
        if let (Ok(t), Ok((o, used))) = (&theirs, &ours)
            && let Some(expected) = oracle::theirs(o)
        {
            prop_assert_eq!(t, &expected);
            prop_assert_eq!(stream.len(), bytes.len() - used);
        }
        // Where only we accept, it is one of two known, deliberate differences: MQTT 3.1.1
        // passwords are binary data (rumqttc wants UTF-8), and an unknown CONNACK code is
        // read as a refusal (`ConnectReturn::Other`) rather than as bad bytes.
        if let (Ok((o, _)), Err(e)) = (&ours, &theirs) {
            let known = match o {
                Packet::Connect(c) => c.password.as_ref().is_some_and(|p| std::str::from_utf8(p).is_err()),
                Packet::ConnAck { code: ConnectReturn::Other(_), .. } => true,
                _ => false,
            };
            prop_assert!(known, "only we accept {:02x?}: {:?} (rumqttc: {:?})", bytes, o, e);
        }
    }
}
