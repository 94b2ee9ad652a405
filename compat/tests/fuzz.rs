//! The parsers against hostile input: whatever /proc/kallsyms, a tracefs format file, a
//! BTF file, a vDSO or discovery's snapshots hold, they answer or refuse, never panic (and
//! discovery never answers wrong). Seeded from the real fixtures and mutated. Case counts
//! are small so CI stays fast; `ci/fuzz.sh N` runs N times as many (TCPCONNLAT_FUZZ_SCALE).

mod support;

use std::path::Path;

use proptest::prelude::*;
use tcpconnlat_compat::kallsyms::AttachPoints;
use tcpconnlat_compat::tracefs::{parse_format, skaddr_offset, StateLayout};
use tcpconnlat_compat::Func;

/// Cases for a property: `base`, times TCPCONNLAT_FUZZ_SCALE (ci/fuzz.sh's long run).
fn cases(base: u32) -> u32 {
    let scale: u32 = std::env::var("TCPCONNLAT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base.saturating_mul(scale)
}

fn config(base: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(base),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `bytes` with bytes changed anywhere, some of the first ones (the header) changed, and
/// what is left kept (a share of it, 0.0 to 1.0).
fn corrupt(
    mut bytes: Vec<u8>,
    flips: Vec<(prop::sample::Index, u8)>,
    header_flips: Vec<(usize, u8)>,
    keep: f64,
) -> Vec<u8> {
    for (at, value) in flips {
        let i = at.index(bytes.len());
        bytes[i] = value;
    }
    for (i, value) in header_flips {
        if i < bytes.len() {
            bytes[i] = value;
        }
    }
    bytes.truncate((bytes.len() as f64 * keep) as usize);
    bytes
}

fn fixture(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const STATE_FORMAT: &str = "deb61/sys/kernel/tracing/events/sock/inet_sock_set_state/format";

/// `text` with one line replaced, dropped or duplicated, or cut short.
fn mutated(text: String) -> impl Strategy<Value = String> {
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let n = lines.len();
    (0..n, 0..4u8, ".{0,40}", 0..=text.len()).prop_map(move |(at, how, junk, cut)| {
        let mut lines = lines.clone();
        match how {
            0 => lines[at] = junk,
            1 => {
                lines.remove(at);
            }
            2 => lines.insert(at, lines[at].clone()),
            _ => {
                let joined = lines.join("\n");
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| joined.is_char_boundary(c))
                    .unwrap_or(0);
                return joined[..cut].to_owned();
            }
        }
        lines.join("\n")
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn kallsyms_never_panics(text in "(([0-9a-f]{0,16} [tTwWdD] [a-z_.0-9]{0,30}( \\[[a-z]+\\])?)?\n){0,20}") {
        let _ = AttachPoints::from_kallsyms(&text);
    }

    #[test]
    fn kallsyms_finds_clones_and_never_fragments(
        entry in prop_oneof![Just(String::new()), "\\.(isra|constprop|llvm)\\.[0-9]{1,6}"],
        fragment in "\\.(part|cold)(\\.[0-9]{1,2})?",
        noise in proptest::collection::vec("[0-9a-f]{16} [tT] [a-z_]{1,20}", 0..30),
        at in any::<prop::sample::Index>(),
        fragment_only in any::<bool>(),
    ) {
        // GCC's clones of the whole function are entry points; .part/.cold pieces are not.
        let mut lines = noise;
        let entry = format!("tcp_v4_connect{entry}");
        let fragment = format!("tcp_v4_connect{fragment}");
        lines.insert(at.index(lines.len() + 1), format!("ffffffff81a00040 t {fragment}"));
        if !fragment_only {
            lines.insert(at.index(lines.len() + 1), format!("ffffffff81a00000 t {entry}"));
        }
        let points = AttachPoints::from_kallsyms(&lines.join("\n"));
        let expected = (!fragment_only).then_some(entry.as_str());
        prop_assert_eq!(points.get(Func::TcpV4Connect), expected);
    }

    #[test]
    fn format_files_never_panic(text in mutated(fixture(STATE_FORMAT))) {
        let _ = parse_format(&text);
        let _ = skaddr_offset(&text);
        if let Ok(layout) = StateLayout::from_format(&text) {
            // What it accepts points inside the record it read.
            let fields = parse_format(&text).unwrap();
            let end = fields.iter().map(|f| f.offset.saturating_add(f.size)).max().unwrap_or(0);
            prop_assert!(usize::from(layout.daddr_v6) < end);
        }
    }

    #[test]
    fn arbitrary_format_text_never_panics(text in "(\tfield:[a-z_ 0-9\\[\\]*]{0,30};\toffset:-?[0-9]{0,6};\tsize:-?[0-9]{0,6};\tsigned:[0-9];\n){0,12}") {
        let _ = parse_format(&text);
        let _ = StateLayout::from_format(&text);
    }
}

mod btf {
    use super::*;
    use proptest::test_runner::TestRunner;
    use tcpconnlat_compat::btf::sock_offsets;
    use tcpconnlat_compat::fixtures::matrix_btfs;

    /// Every matrix kernel's BTF, whole, then corrupted and cut: read or refused, never a
    /// panic, and what is accepted is a plausible struct sock. Each case parses a whole
    /// kernel's BTF: few cases for each.
    #[test]
    fn corrupted_or_cut_btf_is_refused_or_read_never_a_panic() {
        let btfs = matrix_btfs();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mutated.btf");
        for (id, btf) in &btfs {
            std::fs::write(&path, btf).unwrap();
            let whole = sock_offsets(&path).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert!(whole.0.iter().all(|&o| o < 4096), "{id}: {whole:?}");
            let mut runner = TestRunner::new(config(4));
            let strategy = (
                proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
                proptest::collection::vec((0..24usize, any::<u8>()), 0..3),
                0.0..=1.0f64,
            );
            let ran = std::cell::Cell::new(0);
            runner
                .run(&strategy, |(flips, header_flips, keep)| {
                    ran.set(ran.get() + 1);
                    let bytes = corrupt(btf.clone(), flips, header_flips, keep);
                    std::fs::write(&path, &bytes).unwrap();
                    match sock_offsets(&path) {
                        // Whatever it accepts is a plausible struct sock: in its first 4 KiB.
                        Ok(offsets) => prop_assert!(offsets.0.iter().all(|&o| o < 4096)),
                        // Every refusal names the file.
                        Err(e) => {
                            prop_assert!(e.to_string().contains(path.to_str().unwrap()), "{}", e)
                        }
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            eprintln!("{id}: {} corrupted copies", ran.get());
        }
        let ids: Vec<&str> = btfs.iter().map(|(id, _)| *id).collect();
        for id in [
            "deb61", "deb612", "noftrace", "nobtf", "old54", "old414", "old49",
        ] {
            assert!(ids.contains(&id), "no BTF of {id}: {ids:?}");
        }
    }
}

mod vdso {
    use super::*;
    use tcpconnlat_compat::kversion::from_vdso;

    fn images() -> Vec<Vec<u8>> {
        ["host-6.18", "old414", "old54"]
            .iter()
            .map(|k| {
                let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures")
                    .join(k)
                    .join("vdso");
                std::fs::read(path).unwrap()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(config(512))]

        /// A vDSO with bytes changed or cut short: a version or an error, never a panic.
        #[test]
        fn corrupted_vdso_images_never_panic(
            which in 0..3usize,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
            header_flips in proptest::collection::vec((0..64usize, any::<u8>()), 0..4),
            keep in 0.0..=1.0f64,
        ) {
            let image = corrupt(images().swap_remove(which), flips, header_flips, keep);
            let _ = from_vdso(&image);
        }

        #[test]
        fn arbitrary_bytes_are_no_vdso(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(from_vdso(&bytes).is_err() || bytes.starts_with(b"\x7fELF"));
        }
    }
}

mod discover {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use tcpconnlat_compat::discover::{find, DiscoverError, Phase, Sample, SampleFamily, LOOKS};

    /// Where a made-up kernel keeps each field: (v6 pair, addrpair, portpair, err,
    /// family, state), aligned, apart, inside 2 KiB.
    fn layout() -> impl Strategy<Value = [usize; 6]> {
        (
            0..60usize,
            0..250usize,
            0..500usize,
            0..500usize,
            0..1000usize,
            0..2000usize,
        )
            .prop_map(|(v6, pair, ports, err, family, state)| {
                [v6 * 32, pair * 8, ports * 4, err * 4, family * 2, state]
            })
            .prop_filter("fields apart", |at| {
                let sizes = [32, 8, 4, 8, 2, 1]; // err with room for sk_err_soft after it
                (0..6).all(|i| {
                    (0..6).all(|j| i == j || at[i] + sizes[i] <= at[j] || at[j] + sizes[j] <= at[i])
                }) && at.iter().zip(sizes).all(|(a, s)| a + s <= 2048)
            })
    }

    fn snapshot(at: &[usize; 6], s: &Sample, phase: Phase, noise: &[u8]) -> Vec<u8> {
        let mut b = noise.to_vec();
        b.resize(2048, 0);
        let mut put = |o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
        let (local, remote) = (*s.local.ip(), *s.remote.ip());
        if s.family == SampleFamily::V4 {
            put(at[1], &remote.octets());
            put(at[1] + 4, &local.octets());
            put(at[0], &[0; 32]);
        } else {
            put(at[0], &remote.to_ipv6_mapped().octets());
            put(at[0] + 16, &local.to_ipv6_mapped().octets());
        }
        put(at[2], &s.remote.port().to_be_bytes());
        put(at[2] + 2, &s.local.port().to_ne_bytes());
        let err: i32 = if phase == Phase::Leaving && s.refused {
            111
        } else {
            0
        };
        put(at[3], &err.to_ne_bytes());
        put(at[3] + 4, &[0; 4]);
        let family: u16 = if s.family == SampleFamily::V4 { 2 } else { 10 };
        put(at[4], &family.to_ne_bytes());
        put(at[5], &[if phase == Phase::Connecting { 7 } else { 2 }]);
        b
    }

    /// Where a field's value is planted elsewhere: which field, at what offset (a multiple
    /// of its alignment), and in which samples (bit i: sample i; all of them makes it
    /// truly ambiguous).
    #[derive(Clone, Debug)]
    struct Decoy {
        look: usize,
        slot: usize,
        samples: u8,
    }

    fn decoys() -> impl Strategy<Value = Vec<Decoy>> {
        proptest::collection::vec(
            (
                0..LOOKS.len(),
                0..2048usize,
                prop_oneof![Just(0x3f_u8), 1..0x3f_u8],
            )
                .prop_map(|(look, slot, samples)| Decoy {
                    look,
                    slot,
                    samples,
                }),
            0..4,
        )
    }

    /// Where the fields are, as spans: (offset, size), in LOOKS's order.
    fn spans(at: &[usize; 6]) -> [(usize, usize); 6] {
        [
            (at[0], 32),
            (at[1], 8),
            (at[2], 4),
            (at[3], 4),
            (at[4], 2),
            (at[5], 1),
        ]
    }

    /// What discovery must answer, worked out apart: looking for each field in turn, the
    /// aligned offsets not taken by one found before where its value is in every snapshot.
    /// One (its own) for each: found; two or more for one: that field is ambiguous.
    fn oracle(samples: &[Sample], at: &[usize; 6]) -> Result<(), &'static str> {
        let truth = spans(at);
        for (i, look) in LOOKS.iter().enumerate() {
            if samples
                .iter()
                .all(|s| (look.expect)(s, Phase::Leaving).is_none())
            {
                continue;
            }
            let taken = &truth[..i];
            let candidates = (0..=2048 - look.size)
                .step_by(look.align)
                .filter(|&o| taken.iter().all(|&(a, n)| o + look.size <= a || o >= a + n))
                .filter(|&o| {
                    samples.iter().all(|s| {
                        [
                            (&s.connecting, Phase::Connecting),
                            (&s.leaving, Phase::Leaving),
                        ]
                        .iter()
                        .all(|(bytes, phase)| {
                            match (look.expect)(s, *phase) {
                                Some(want) => bytes[o..o + look.size] == want[..],
                                None => true,
                            }
                        })
                    })
                })
                .count();
            if candidates > 1 {
                return Err(look.name);
            }
        }
        Ok(())
    }

    /// On any layout, under noise that differs from snapshot to snapshot and with the
    /// fields' values planted at other offsets (in some snapshots, or in all), discovery
    /// finds the fields where they are, or refuses exactly where the snapshots are
    /// ambiguous: never another offset. Both answers must come up.
    #[test]
    fn discovery_is_right_or_refuses() {
        let strategy = (
            layout(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2048), 12),
            proptest::collection::vec((1..255u8, 1..255u8, 10_000..60_000u16), 6),
            decoys(),
        );
        let mut runner = proptest::test_runner::TestRunner::new(config(256));
        let counts = std::cell::Cell::new((0u32, 0u32));
        runner
            .run(&strategy, |(at, noises, values, decoys)| {
                let plan = [
                    (SampleFamily::V4, false),
                    (SampleFamily::V4, true),
                    (SampleFamily::V4, false),
                    (SampleFamily::V4, true),
                    (SampleFamily::V6Mapped, false),
                    (SampleFamily::V6Mapped, true),
                ];
                let truth = spans(&at);
                // Local ports of their own, as the tracer's connects have (else it refuses).
                let base = values[0].2;
                let mut samples: Vec<Sample> = plan
                    .iter()
                    .zip(&values)
                    .enumerate()
                    .map(|(i, (&(family, refused), &(a, b, port)))| {
                        let mut s = Sample {
                            family,
                            local: SocketAddrV4::new(
                                Ipv4Addr::new(127, a, b, i as u8 + 1),
                                base + i as u16,
                            ),
                            remote: SocketAddrV4::new(Ipv4Addr::new(127, b, a, 9), port ^ 0x5a5a),
                            refused,
                            connecting: Vec::new(),
                            leaving: Vec::new(),
                        };
                        s.connecting = snapshot(&at, &s, Phase::Connecting, &noises[2 * i]);
                        s.leaving = snapshot(&at, &s, Phase::Leaving, &noises[2 * i + 1]);
                        s
                    })
                    .collect();
                for decoy in &decoys {
                    let look = &LOOKS[decoy.look];
                    let offset = decoy.slot / look.align * look.align;
                    let clear = offset + look.size <= 2048
                        && truth
                            .iter()
                            .all(|&(a, n)| offset + look.size <= a || offset >= a + n);
                    if !clear {
                        continue;
                    }
                    for (i, s) in samples.iter_mut().enumerate() {
                        if decoy.samples & (1 << i) == 0 {
                            continue;
                        }
                        for phase in [Phase::Connecting, Phase::Leaving] {
                            if let Some(value) = (look.expect)(s, phase) {
                                let bytes = match phase {
                                    Phase::Connecting => &mut s.connecting,
                                    Phase::Leaving => &mut s.leaving,
                                };
                                bytes[offset..offset + look.size].copy_from_slice(&value);
                            }
                        }
                    }
                }
                match (find(&samples), oracle(&samples, &at)) {
                    (Ok(found), Ok(())) => {
                        let get = |name| usize::from(found.offsets.get(name).unwrap());
                        prop_assert_eq!(get("v6_daddr"), at[0]);
                        prop_assert_eq!(get("v6_rcv_saddr"), at[0] + 16);
                        prop_assert_eq!(get("daddr"), at[1]);
                        prop_assert_eq!(get("rcv_saddr"), at[1] + 4);
                        prop_assert_eq!(get("dport"), at[2]);
                        prop_assert_eq!(get("num"), at[2] + 2);
                        prop_assert_eq!(get("err"), at[3]);
                        prop_assert_eq!(get("err_soft"), 0);
                        prop_assert_eq!(get("family"), at[4]);
                        prop_assert_eq!(get("state"), at[5]);
                        let (f, r) = counts.get();
                        counts.set((f + 1, r));
                    }
                    (Err(DiscoverError::Ambiguous { field, .. }), Err(ambiguous)) => {
                        prop_assert_eq!(field, ambiguous);
                        let (f, r) = counts.get();
                        counts.set((f, r + 1));
                    }
                    (answer, expected) => {
                        prop_assert!(
                            false,
                            "discovery said {:?}, the snapshots {:?}",
                            answer,
                            expected
                        );
                    }
                }
                Ok(())
            })
            .unwrap();
        let (found, refused) = counts.get();
        eprintln!("discovery: {found} found, {refused} refused as ambiguous");
        assert!(found > 0 && refused > 0, "{found} found, {refused} refused");
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Snapshots of any length and content: an answer or an error, never a panic.
        #[test]
        fn arbitrary_snapshots_never_panic(
            lens in proptest::collection::vec((0..3000usize, 0..3000usize), 6),
            fill in any::<u8>(),
        ) {
            let samples: Vec<Sample> = lens.iter().enumerate().map(|(i, &(a, b))| Sample {
                family: if i < 4 { SampleFamily::V4 } else { SampleFamily::V6Mapped },
                local: SocketAddrV4::new(Ipv4Addr::new(127, 1, 1, i as u8), 20_000 + i as u16),
                remote: SocketAddrV4::new(Ipv4Addr::new(127, 2, 2, 2), 30_000),
                refused: i % 2 == 1,
                connecting: vec![fill; a],
                leaving: vec![fill; b],
            }).collect();
            let _ = find(&samples);
        }
    }
}
