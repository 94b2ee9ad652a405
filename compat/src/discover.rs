//! Finding struct sock offsets in snapshots: where neither BTF nor kernel headers give the
//! layout, tcpconnlat copies the start of struct sock for connects it makes itself, with
//! addresses and ports it chose, and each field is where its known value is.
//!
//! Never a guess: a field must hold its expected value in every snapshot, at exactly one
//! offset aligned to its size and not taken by a field found before; anything else is an
//! error naming the field. Fields that come in pairs are found as the pair, the way the
//! kernel declares them, and the pair's halves follow from that declaration:
//! - `skc_addrpair` (8 bytes, 8-aligned): `skc_daddr`, then `skc_rcv_saddr`;
//! - `skc_portpair` (4 bytes): `skc_dport` (network order), then `skc_num` (host order);
//! - `skc_v6_daddr`, then `skc_v6_rcv_saddr` (16 bytes each), adjacent in sock_common.
//!
//! The pairs are what tell the socket's own fields from their copies elsewhere in the
//! socket (inet_saddr, the route lookup's flowi4), which hold the same values.
//!
//! `sk_err_soft` is set by no connect tcpconnlat can make, so it is never found: kernels
//! up to 6.8 keep it right after `sk_err`, but 6.9 regrouped struct sock and a
//! distribution's kernel may carry that change under an older version, so taking it from
//! the version would be a guess. It stays unknown, and the note says what that costs.

use std::net::{Ipv4Addr, SocketAddrV4};

use thiserror::Error;

use crate::btf::{sock_fields, SockField, SockOffsets, SOCK_FIELDS};
use crate::hooks::NO_IPV6;

#[allow(dead_code)]
mod tcp_states {
    include!(concat!(env!("OUT_DIR"), "/tcp_states.rs"));
}
use tcp_states::{TCP_CLOSE, TCP_SYN_SENT};

/// Which kind of socket a sample connected with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleFamily {
    /// AF_INET.
    V4,
    /// AF_INET6, to an IPv4-mapped address (`::ffff:a.b.c.d`): the v6 fields hold
    /// patterns of our choosing without an IPv6 address on the host.
    V6Mapped,
}

/// One connect of ours: what it was, and struct sock as the kernel had it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub family: SampleFamily,
    /// Where the socket was bound.
    pub local: SocketAddrV4,
    /// Where it connected.
    pub remote: SocketAddrV4,
    /// Refused (an RST, ECONNREFUSED in sk_err) rather than established.
    pub refused: bool,
    /// At tcp_set_state(sk, SYN_SENT): inside connect(), state still CLOSE.
    pub connecting: Vec<u8>,
    /// At the first tcp_set_state after: the answer arrived, state still SYN_SENT.
    pub leaving: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiscoverError {
    #[error("{field}: no offset holds its value in every snapshot")]
    NotFound { field: &'static str },
    #[error("{field}: {} offsets hold its value in every snapshot ({})", offsets.len(), list(offsets))]
    Ambiguous {
        field: &'static str,
        offsets: Vec<usize>,
    },
    #[error("too few connects to tell fields apart: {0}")]
    TooFewSamples(String),
    #[error("{field}: offset {offset} does not fit the 16-bit offsets the probes take")]
    TooFar { field: &'static str, offset: usize },
    #[error("{field}: discovery does not look for this field of probes/sock_fields.h")]
    NotLookedFor { field: &'static str },
}

fn list(offsets: &[usize]) -> String {
    let shown: Vec<String> = offsets.iter().take(6).map(usize::to_string).collect();
    shown.join(", ")
}

/// What discovery found: every field's offset (0 for one that could not be had, which only
/// `v6_*` without IPv6 and `err_soft` can be), and what the user should know of the gaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub offsets: SockOffsets,
    pub notes: Vec<String>,
}

/// What a field must hold in a snapshot, or `None` where this snapshot says nothing of it.
pub type Expect = fn(&Sample, Phase) -> Option<Vec<u8>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Leaving,
}

/// A field (or declared pair of fields) looked for as one: at an offset aligned to
/// `align`, `size` bytes holding what `expect` says in every snapshot. `fields` are the
/// fields of `probes/sock_fields.h` it holds, each at its place within it.
pub struct Look {
    pub name: &'static str,
    pub size: usize,
    pub align: usize,
    pub expect: Expect,
    pub fields: &'static [(&'static str, usize)],
}

/// The fields no connect of ours can show (see the module's documentation).
pub const NOT_LOOKED_FOR: &[&str] = &["err_soft"];

fn v6_mapped(addr: Ipv4Addr) -> [u8; 16] {
    addr.to_ipv6_mapped().octets()
}

/// In the order they are looked for: the widest, most particular patterns first, so the
/// later ones cannot take their bytes.
pub const LOOKS: [Look; 6] = [
    Look {
        name: "skc_v6_daddr/skc_v6_rcv_saddr",
        size: 32,
        align: 4,
        fields: &[("v6_daddr", 0), ("v6_rcv_saddr", 16)],
        expect: |s, _| {
            (s.family == SampleFamily::V6Mapped).then(|| {
                let mut v = v6_mapped(*s.remote.ip()).to_vec();
                v.extend(v6_mapped(*s.local.ip()));
                v
            })
        },
    },
    Look {
        name: "skc_addrpair",
        size: 8,
        align: 8,
        fields: &[("daddr", 0), ("rcv_saddr", 4)],
        expect: |s, _| {
            (s.family == SampleFamily::V4).then(|| {
                let mut v = s.remote.ip().octets().to_vec();
                v.extend(s.local.ip().octets());
                v
            })
        },
    },
    Look {
        name: "skc_portpair",
        size: 4,
        align: 4,
        fields: &[("dport", 0), ("num", 2)],
        expect: |s, _| {
            let mut v = s.remote.port().to_be_bytes().to_vec();
            v.extend(s.local.port().to_ne_bytes());
            Some(v)
        },
    },
    Look {
        name: "sk_err",
        size: 4,
        align: 4,
        fields: &[("err", 0)],
        expect: |s, phase| {
            let err = if phase == Phase::Leaving && s.refused {
                libc::ECONNREFUSED
            } else {
                0
            };
            Some(err.to_ne_bytes().to_vec())
        },
    },
    Look {
        name: "skc_family",
        size: 2,
        align: 2,
        fields: &[("family", 0)],
        expect: |s, _| {
            let family = match s.family {
                SampleFamily::V4 => libc::AF_INET,
                SampleFamily::V6Mapped => libc::AF_INET6,
            };
            // sa_family_t: 16 bits.
            Some((family as u16).to_ne_bytes().to_vec())
        },
    },
    Look {
        name: "skc_state",
        size: 1,
        align: 1,
        fields: &[("state", 0)],
        expect: |_, phase| {
            Some(vec![match phase {
                Phase::Connecting => TCP_CLOSE,
                Phase::Leaving => TCP_SYN_SENT,
            }])
        },
    },
];

/// Find every field of `probes/sock_fields.h` in `samples` (all but `sk_err_soft`).
pub fn find(samples: &[Sample]) -> Result<Found, DiscoverError> {
    check_samples(samples)?;
    let mut taken: Vec<(usize, usize)> = Vec::new();
    let mut at = [None; LOOKS.len()];
    for (i, look) in LOOKS.iter().enumerate() {
        let applies = samples
            .iter()
            .any(|s| (look.expect)(s, Phase::Leaving).is_some());
        if !applies {
            continue;
        }
        let offset = find_one(look, samples, &taken)?;
        taken.push((offset, offset + look.size));
        at[i] = Some(offset);
    }
    let mut notes = Vec::new();
    if found_at(&at, "v6_daddr") == Some(None) {
        notes.push(format!("{NO_IPV6}: this kernel has no IPv6"));
    }
    notes.push(ERR_SOFT_UNKNOWN.to_owned());
    Ok(Found {
        offsets: place(sock_fields(), &at)?,
        notes,
    })
}

/// Each of `fields` at the offset its look was found at (0 where the look did not apply:
/// IPv6's without IPv6 samples, and the fields no connect can show). A field no look
/// holds is an error: a field added to sock_fields.h must be looked for here.
fn place(
    fields: &[SockField],
    at: &[Option<usize>; LOOKS.len()],
) -> Result<SockOffsets, DiscoverError> {
    let mut offsets = [0u16; SOCK_FIELDS];
    for (slot, field) in offsets.iter_mut().zip(fields) {
        let name = field.name;
        let offset = match found_at(at, name) {
            Some(offset) => offset,
            None if NOT_LOOKED_FOR.contains(&name) => None,
            None => return Err(DiscoverError::NotLookedFor { field: name }),
        };
        if let Some(offset) = offset {
            *slot = u16::try_from(offset).map_err(|_| DiscoverError::TooFar {
                field: name,
                offset,
            })?;
        }
    }
    Ok(SockOffsets(offsets))
}

/// Where field `name` was found (`Some(None)`: its look did not apply), or `None` where no
/// look holds it.
fn found_at(at: &[Option<usize>; LOOKS.len()], name: &str) -> Option<Option<usize>> {
    LOOKS.iter().zip(at).find_map(|(look, at)| {
        let (_, within) = look.fields.iter().find(|(f, _)| *f == name)?;
        Some(at.map(|at| at + within))
    })
}

/// Enough connects of each kind, each with values of its own, for a match to mean
/// something.
fn check_samples(samples: &[Sample]) -> Result<(), DiscoverError> {
    let v4 = samples.iter().filter(|s| s.family == SampleFamily::V4);
    let (refused, established) = v4.fold(
        (0, 0),
        |(r, e), s| {
            if s.refused {
                (r + 1, e)
            } else {
                (r, e + 1)
            }
        },
    );
    if refused < 2 || established < 2 {
        return Err(DiscoverError::TooFewSamples(format!(
            "{established} established and {refused} refused IPv4 connects (2 each at least)"
        )));
    }
    let mut ports: Vec<u16> = samples.iter().map(|s| s.local.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.len() != samples.len() {
        return Err(DiscoverError::TooFewSamples(
            "two connects had the same local port".to_owned(),
        ));
    }
    Ok(())
}

/// The one offset, aligned and free, where `look` holds in every snapshot of every sample.
fn find_one(
    look: &Look,
    samples: &[Sample],
    taken: &[(usize, usize)],
) -> Result<usize, DiscoverError> {
    let len = samples
        .iter()
        .flat_map(|s| [s.connecting.len(), s.leaving.len()])
        .min()
        .unwrap_or(0);
    let expected: Vec<(&[u8], Vec<u8>)> = samples
        .iter()
        .flat_map(|s| {
            [
                (s.connecting.as_slice(), Phase::Connecting),
                (s.leaving.as_slice(), Phase::Leaving),
            ]
            .into_iter()
            .filter_map(move |(bytes, phase)| Some((bytes, (look.expect)(s, phase)?)))
        })
        .collect();
    let free = |o: usize| taken.iter().all(|&(a, b)| o + look.size <= a || o >= b);
    // Offsets where the field fits in every snapshot (none in snapshots shorter than it).
    let matches: Vec<usize> = (0..(len + 1).saturating_sub(look.size))
        .step_by(look.align)
        .filter(|&o| free(o))
        .filter(|&o| {
            expected
                .iter()
                .all(|(bytes, want)| bytes[o..o + look.size] == want[..])
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(DiscoverError::NotFound { field: look.name }),
        _ => Err(DiscoverError::Ambiguous {
            field: look.name,
            offsets: matches,
        }),
    }
}

/// What discovery says of `sk_err_soft` (see the module's documentation).
pub const ERR_SOFT_UNKNOWN: &str = "sk_err_soft is unknown (no connect can set it, and \
     its place after sk_err changed in Linux 6.9): an ICMP error behind a connect the \
     application gave up on reads as a timeout";

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up struct sock laid out as 6.1's (sock_common at 0, sk_err at 544), with the
    /// copies that make the pairs necessary: inet_saddr and a flowi4 further on.
    fn snapshot(s: &Sample, phase: Phase) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        let (local, remote) = (s.local.ip().octets(), s.remote.ip().octets());
        if s.family == SampleFamily::V4 {
            put(&mut b, 0, &remote);
            put(&mut b, 4, &local);
        } else {
            put(&mut b, 56, &v6_mapped(*s.remote.ip()));
            put(&mut b, 72, &v6_mapped(*s.local.ip()));
        }
        put(&mut b, 12, &s.remote.port().to_be_bytes());
        put(&mut b, 14, &s.local.port().to_ne_bytes());
        let family: u16 = if s.family == SampleFamily::V4 { 2 } else { 10 };
        put(&mut b, 16, &family.to_ne_bytes());
        b[18] = if phase == Phase::Connecting { 7 } else { 2 };
        if phase == Phase::Leaving && s.refused {
            put(&mut b, 544, &111i32.to_ne_bytes());
        }
        // inet_saddr, and a flowi4: saddr, daddr, dport, sport.
        put(&mut b, 800, &local);
        put(&mut b, 900, &local);
        put(&mut b, 904, &remote);
        put(&mut b, 908, &s.remote.port().to_be_bytes());
        put(&mut b, 910, &s.local.port().to_be_bytes());
        b
    }

    fn sample(n: u8, family: SampleFamily, refused: bool) -> Sample {
        let mut s = Sample {
            family,
            local: SocketAddrV4::new(Ipv4Addr::new(127, n, 2, 3), 40001 + u16::from(n) * 7),
            remote: SocketAddrV4::new(Ipv4Addr::new(127, 9, n, 5), 50003 + u16::from(n) * 11),
            refused,
            connecting: Vec::new(),
            leaving: Vec::new(),
        };
        s.connecting = snapshot(&s, Phase::Connecting);
        s.leaving = snapshot(&s, Phase::Leaving);
        s
    }

    fn samples() -> Vec<Sample> {
        use SampleFamily::*;
        vec![
            sample(1, V4, false),
            sample(2, V4, true),
            sample(3, V4, false),
            sample(4, V4, true),
            sample(5, V6Mapped, false),
            sample(6, V6Mapped, true),
        ]
    }

    fn get(found: &Found, name: &str) -> u16 {
        found.offsets.get(name).unwrap()
    }

    #[test]
    fn every_field_is_found_where_its_value_is() {
        let found = find(&samples()).unwrap();
        let want = [
            ("daddr", 0),
            ("rcv_saddr", 4),
            ("dport", 12),
            ("num", 14),
            ("family", 16),
            ("state", 18),
            ("v6_daddr", 56),
            ("v6_rcv_saddr", 72),
            ("err", 544),
        ];
        for (name, offset) in want {
            assert_eq!(get(&found, name), offset, "{name}");
        }
        assert_eq!(found.notes, [ERR_SOFT_UNKNOWN]);
    }

    /// Even where the bytes after sk_err are free and zero, as sk_err_soft's would be.
    /// A field added to sock_fields.h without a look that holds it is refused by name,
    /// not left at offset 0.
    #[test]
    fn a_field_no_look_holds_is_an_error_naming_it() {
        let at = [Some(0), Some(40), Some(48), Some(60), Some(52), Some(54)];
        assert!(place(sock_fields(), &at).is_ok());
        let mut fields = sock_fields().to_vec();
        fields[2] = SockField {
            name: "sk_new_field",
            path: &["sk_new_field"],
        };
        assert_eq!(
            place(&fields, &at),
            Err(DiscoverError::NotLookedFor {
                field: "sk_new_field"
            })
        );
    }

    #[test]
    fn err_soft_is_never_guessed() {
        let found = find(&samples()).unwrap();
        assert_eq!(get(&found, "err_soft"), 0);
        assert!(found.notes.iter().any(|n| n.contains("sk_err_soft")));
    }

    #[test]
    fn a_field_at_two_places_is_an_error_naming_it() {
        let mut samples = samples();
        for s in &mut samples {
            // A second byte that is CLOSE, then SYN_SENT: no way to tell which is state.
            s.connecting[1500] = 7;
            s.leaving[1500] = 2;
        }
        let err = find(&samples).unwrap_err();
        assert_eq!(
            err,
            DiscoverError::Ambiguous {
                field: "skc_state",
                offsets: vec![18, 1500]
            }
        );
        assert_eq!(
            err.to_string(),
            "skc_state: 2 offsets hold its value in every snapshot (18, 1500)"
        );
    }

    #[test]
    fn a_value_missing_from_one_snapshot_is_not_found() {
        let mut samples = samples();
        samples[3].leaving[544] = 0; // a refused connect whose sk_err was not set
        assert_eq!(
            find(&samples).unwrap_err(),
            DiscoverError::NotFound { field: "sk_err" }
        );
    }

    #[test]
    fn without_ipv6_samples_the_v6_fields_are_unknown_and_said() {
        let v4: Vec<Sample> = samples()
            .into_iter()
            .filter(|s| s.family == SampleFamily::V4)
            .collect();
        let found = find(&v4).unwrap();
        assert_eq!(
            (get(&found, "v6_daddr"), get(&found, "v6_rcv_saddr")),
            (0, 0)
        );
        assert_eq!(get(&found, "daddr"), 0);
        assert_eq!(get(&found, "rcv_saddr"), 4);
        assert!(found.notes.iter().any(|n| n.contains("IPv6")));
    }

    #[test]
    fn too_few_or_alike_connects_are_refused() {
        let mut few = samples();
        few.remove(1);
        few.remove(2);
        assert!(matches!(find(&few), Err(DiscoverError::TooFewSamples(_))));
        let mut alike = samples();
        alike[1].local = alike[0].local;
        assert!(matches!(find(&alike), Err(DiscoverError::TooFewSamples(_))));
    }
}
