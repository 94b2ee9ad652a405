//! The parsers against hostile input: whatever /proc/kallsyms, a tracefs format file or a
//! BTF file holds, they answer or refuse, never panic. Seeded from the real fixtures and
//! mutated; case counts are kept small so CI stays fast.

mod support;

use std::path::Path;

use proptest::prelude::*;
use tcpconnlat_compat::kallsyms::AttachPoints;
use tcpconnlat_compat::tracefs::{parse_format, skaddr_offset, StateLayout};
use tcpconnlat_compat::Func;

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
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

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
    use std::process::Command;
    use tcpconnlat_compat::btf::sock_offsets;

    fn real_btf() -> &'static [u8] {
        static BTF: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BTF.get_or_init(|| {
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/btf/nobtf-6.1.192.btf.xz");
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&fixture)
                .output()
                .expect("xz");
            assert!(out.status.success());
            out.stdout
        })
    }

    proptest! {
        // Each case parses a whole kernel's BTF: few cases.
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn corrupted_or_cut_btf_is_refused_or_read_never_a_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            header_flips in proptest::collection::vec((0..24usize, any::<u8>()), 0..3),
            keep in 0.0..=1.0f64,
        ) {
            let mut bytes = real_btf().to_vec();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            for (i, value) in header_flips {
                bytes[i] = value;
            }
            bytes.truncate((bytes.len() as f64 * keep) as usize);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("mutated.btf");
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(offsets) = sock_offsets(&path) {
                // Whatever it accepts is a plausible struct sock: inside its first 4 KiB.
                prop_assert!(offsets.0.iter().all(|&o| o < 4096));
            }
        }
    }
}
