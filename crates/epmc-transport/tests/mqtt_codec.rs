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
            proptest::collection::vec(proptest::option::of(qos()), 0..4)
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
