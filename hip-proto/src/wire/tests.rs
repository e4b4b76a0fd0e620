use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn appendix_c_i1() -> Vec<u8> {
    let mut b = PacketBuilder::new(
        PacketType::I1,
        0,
        "2001:20::1".parse().unwrap(),
        "2001:20::2".parse().unwrap(),
    );
    b.push(&Param::DhGroupList(vec![3, 4, 8])).unwrap();
    b.finish()
}

#[test]
fn rfc7401_appendix_c_checksums() {
    let mut p = appendix_c_i1();
    assert_eq!(p.len(), 48);
    let s6: IpAddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().into();
    let d6: IpAddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().into();
    assert_eq!(checksum(s6, d6, &p), Some(0x1a5e));
    let s4: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    let d4: IpAddr = Ipv4Addr::new(192, 0, 2, 2).into();
    assert_eq!(checksum(s4, d4, &p), Some(0xf1ce));
    set_checksum(&mut p, s6, d6);
    assert!(verify_checksum(&p, s6, d6));
    assert!(!verify_checksum(&p, s4, d4));
    p[45] ^= 1;
    assert!(!verify_checksum(&p, s6, d6));
    assert_eq!(checksum(s4, d6, &p), None);
}

#[test]
fn the_checksum_of_any_slice_is_computed_without_overflow() {
    // Found by the hip_packet_parse and hip_endpoint_input fuzz targets: a 400 KB input
    // overflowed the 32-bit sum
    // (a panic with overflow checks, a wrong checksum without). No datagram is that long,
    // but the function takes any slice.
    let s6: IpAddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().into();
    let d6: IpAddr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().into();
    let mut big = vec![0xffu8; 408_535];
    big[4] = 0;
    big[5] = 0;
    let c = checksum(s6, d6, &big).expect("IPv6 takes it");
    set_checksum(&mut big, s6, d6);
    assert_eq!(u16::from_be_bytes([big[4], big[5]]), c);
    assert!(verify_checksum(&big, s6, d6));
    // Ordinary packets keep their checksum.
    let small = appendix_c_i1();
    assert_eq!(checksum(s6, d6, &small), Some(0x1a5e));
    // Over IPv4 the pseudo-header's length is 16 bits: a longer input has no checksum.
    let s4: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    let d4: IpAddr = Ipv4Addr::new(192, 0, 2, 2).into();
    assert_eq!(checksum(s4, d4, &big), None);
    assert!(!verify_checksum(&big, s4, d4));
    assert!(checksum(s4, d4, &big[..65_535]).is_some());
}

fn all_params() -> Vec<Param> {
    vec![
        Param::EspInfo {
            keymat_index: 7,
            old_spi: 0,
            new_spi: 0x1234_5678,
        },
        Param::R1Counter(0x0102_0304_0506_0708),
        Param::LocatorSet(vec![
            Locator {
                traffic_type: 0,
                locator_type: 1,
                preferred: true,
                lifetime: 600,
                locator: [
                    &[0, 0, 1, 0][..],
                    &[0x20, 1, 0xd, 0xb8][..],
                    &[0; 11][..],
                    &[1],
                ]
                .concat(),
            },
            Locator {
                traffic_type: 2,
                locator_type: 0,
                preferred: false,
                lifetime: 0,
                locator: Ipv4Addr::new(192, 0, 2, 9)
                    .to_ipv6_mapped()
                    .octets()
                    .to_vec(),
            },
        ]),
        Param::Puzzle {
            k: 10,
            lifetime: 37,
            opaque: [1, 2],
            random_i: vec![9; 32],
        },
        Param::Solution {
            k: 10,
            opaque: [1, 2],
            random_i: vec![9; 32],
            solution_j: vec![8; 32],
        },
        Param::Seq(5),
        Param::Ack(vec![1, 2]),
        Param::DhGroupList(vec![7, 8, 4]),
        Param::DiffieHellman {
            group: 7,
            public: vec![4; 65],
        },
        Param::HipCipher(vec![4, 2, 1]),
        Param::Encrypted(vec![0xaa; 48]),
        Param::HostId {
            algorithm: 7,
            hi: vec![0, 1, 4, 5, 6],
            di_type: 1,
            di: b"alice.example".to_vec(),
        },
        Param::HitSuiteList(vec![0x20, 0x10]),
        Param::Notification {
            msg_type: notify::INVALID_SYNTAX,
            data: vec![1, 2, 3],
        },
        Param::EchoRequestSigned(vec![1, 2, 3, 4]),
        Param::EchoResponseSigned(vec![1, 2, 3, 4]),
        Param::TransportFormatList(vec![ty::ESP_TRANSFORM]),
        Param::EspTransform(vec![13, 8, 7]),
        Param::Hmac(vec![3; 48]),
        Param::Hmac2(vec![3; 32]),
        Param::Signature2 {
            algorithm: 7,
            signature: vec![5; 64],
        },
        Param::Signature {
            algorithm: 13,
            signature: vec![6; 64],
        },
        Param::EchoResponseUnsigned(vec![7; 3]),
        Param::EchoRequestUnsigned(vec![7; 9]),
    ]
}

#[test]
fn every_parameter_round_trips_byte_exact() {
    let params = all_params();
    let mut b = PacketBuilder::new(PacketType::Update, 0, Hit([1; 16]), Hit([2; 16]));
    for p in &params {
        let bytes = p.to_bytes();
        assert_eq!(bytes.len() % 8, 0, "{p:?}");
        let len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
        let back = Param::parse(p.ty(), &bytes[4..4 + len]).unwrap();
        assert_eq!(&back, p);
        assert_eq!(back.to_bytes(), bytes);
        b.push(p).unwrap();
    }
    let pkt = b.finish();
    let parsed = Packet::parse(&pkt).unwrap();
    assert_eq!(parsed.params.len(), params.len());
    let mut again = PacketBuilder::new(PacketType::Update, 0, Hit([1; 16]), Hit([2; 16]));
    for (raw, p) in parsed.params.iter().zip(&params) {
        assert_eq!(&raw.parse().unwrap(), p);
        again.push(&raw.parse().unwrap()).unwrap();
    }
    assert_eq!(again.finish(), pkt);
}

#[test]
fn header_errors() {
    let p = appendix_c_i1();
    assert_eq!(
        Packet::parse(&p[..39]).unwrap_err(),
        WireError::TooShort(39)
    );
    let mut q = p.clone();
    q[1] = 6;
    assert!(matches!(
        Packet::parse(&q),
        Err(WireError::LengthMismatch {
            declared: 56,
            actual: 48
        })
    ));
    let mut q = p.clone();
    q[3] = 0x11;
    assert_eq!(Packet::parse(&q).unwrap_err(), WireError::Version(1));
    let mut q = p.clone();
    q[2] = 9;
    assert_eq!(
        Packet::parse(&q).unwrap_err(),
        WireError::UnknownPacketType(9)
    );
    let mut q = p.clone();
    q[3] = 0x20;
    assert_eq!(Packet::parse(&q).unwrap_err(), WireError::FixedBits);
}

#[test]
fn truncated_and_oversized_parameters() {
    let mut p = appendix_c_i1();
    // Declare a contents length running past the packet end.
    p[42..44].copy_from_slice(&200u16.to_be_bytes());
    assert!(matches!(
        Packet::parse(&p),
        Err(WireError::TruncatedParam {
            ty: ty::DH_GROUP_LIST,
            offset: 40
        })
    ));
    // A DIFFIE_HELLMAN whose public value length exceeds the parameter.
    let mut c = vec![7u8];
    c.extend_from_slice(&100u16.to_be_bytes());
    c.extend_from_slice(&[4; 65]);
    assert!(matches!(
        Param::parse(ty::DIFFIE_HELLMAN, &c),
        Err(WireError::BadParam { .. })
    ));
    // HOST_ID lengths that disagree with the parameter length.
    let mut hid = Param::HostId {
        algorithm: 7,
        hi: vec![1; 10],
        di_type: 0,
        di: vec![],
    }
    .to_bytes();
    hid[4..6].copy_from_slice(&11u16.to_be_bytes());
    assert!(Param::parse(ty::HOST_ID, &hid[4..4 + 16]).is_err());
    assert!(Param::parse(ty::ESP_INFO, &[0; 11]).is_err());
    assert!(Param::parse(ty::SOLUTION, &[0; 7]).is_err());
    assert!(Param::parse(ty::LOCATOR_SET, &[0, 0, 4, 0, 0, 0, 0, 0]).is_err());
}

#[test]
fn parameters_out_of_order() {
    let mut v = PacketBuilder::new(PacketType::R1, 0, Hit([1; 16]), Hit::ZERO);
    v.push(&Param::HipCipher(vec![4])).unwrap();
    assert!(matches!(
        v.push(&Param::DhGroupList(vec![7])),
        Err(WireError::OutOfOrder { .. })
    ));
    // Swap two parameters of a valid packet by hand.
    let mut b = PacketBuilder::new(PacketType::R1, 0, Hit([1; 16]), Hit::ZERO);
    b.push(&Param::DhGroupList(vec![7])).unwrap();
    b.push(&Param::HipCipher(vec![4])).unwrap();
    let mut p = b.finish();
    let a = p[40..48].to_vec();
    let c = p[48..56].to_vec();
    p[40..48].copy_from_slice(&c);
    p[48..56].copy_from_slice(&a);
    assert_eq!(
        Packet::parse(&p).unwrap_err(),
        WireError::OutOfOrder {
            ty: ty::DH_GROUP_LIST,
            prev: ty::HIP_CIPHER
        }
    );
}

/// Seeded random mutations of valid packets: parsing never panics.
#[test]
fn mutations_never_panic() {
    let mut b = PacketBuilder::new(PacketType::Update, 0, Hit([1; 16]), Hit([2; 16]));
    for p in all_params() {
        b.push(&p).unwrap();
    }
    let base = b.finish();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let mut p = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % p.len();
            p[i] = next() as u8;
        }
        let cut = (next() as usize) % (p.len() + 1);
        let p = &p[..cut.max(p.len() - (next() as usize % 16))];
        if let Ok(pkt) = Packet::parse(p) {
            for r in &pkt.params {
                let _ = r.parse();
            }
        }
    }
}
