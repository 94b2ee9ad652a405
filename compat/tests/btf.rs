//! struct sock offsets from BTF, against a BTF file made (with pahole) for the matrix's
//! no-BTF 6.1 kernel, and against kernel headers of the very same build.

mod support;

use std::path::Path;

use tcpconnlat_compat::btf::{sock_fields, sock_offsets, BtfError, SockOffsets, SOCK_FIELDS};
use tcpconnlat_compat::Func;

/// What build.rs read from that kernel's headers (KERNEL_HEADERS=its build tree); the
/// kernel matrix runs legacy mode on it with both sources.
/// In the order of probes/sock_fields.h: family, state, num, dport, rcv_saddr, daddr,
/// v6_rcv_saddr, v6_daddr, err, err_soft.
const FROM_HEADERS: SockOffsets = SockOffsets([16, 18, 14, 12, 4, 0, 72, 56, 528, 532]);

fn unpacked(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("vmlinux.btf");
    std::fs::write(&path, support::nobtf_btf()).unwrap();
    path
}

#[test]
fn btf_offsets_match_the_kernel_headers() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = sock_offsets(&unpacked(dir.path())).unwrap();
    // Fields inside anonymous unions (skc_daddr, skc_num, skc_dport) and nested structs
    // (__sk_common) are found, at the same bytes the compiler put them.
    assert_eq!(offsets, FROM_HEADERS);
}

#[test]
fn bad_btf_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.btf");
    std::fs::write(&garbage, b"not BTF at all").unwrap();
    let err = sock_offsets(&garbage).unwrap_err();
    assert!(matches!(err, BtfError::Read { .. }), "{err}");
    assert!(err.to_string().contains("garbage.btf"), "{err}");

    let truncated = dir.path().join("truncated.btf");
    let full = std::fs::read(unpacked(dir.path())).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 3]).unwrap();
    assert!(sock_offsets(&truncated).is_err());

    let missing = dir.path().join("nope.btf");
    assert!(sock_offsets(&missing)
        .unwrap_err()
        .to_string()
        .contains("nope.btf"));
}

#[test]
fn offsets_need_every_field() {
    let names = sock_fields().iter().map(|f| f.name);
    let all = SockOffsets::from_pairs(names.clone().zip(1..)).unwrap();
    assert_eq!(
        (all.get("family"), all.get("err_soft")),
        (Some(1), Some(10))
    );
    let err = SockOffsets::from_pairs(names.take(9).zip(1..)).unwrap_err();
    assert!(err.contains("err_soft"), "{err}");
}

/// probes/sock_fields.h is read as the one list of fields.
#[test]
fn the_field_list_is_probes_sock_fields_h() {
    assert_eq!(SOCK_FIELDS, 10);
    assert_eq!(sock_fields().len(), SOCK_FIELDS);
    assert_eq!(sock_fields()[0].name, "family");
    assert_eq!(sock_fields()[0].path, ["__sk_common", "skc_family"]);
    assert_eq!(sock_fields()[9].path, ["sk_err_soft"]);
}

#[test]
fn btf_says_which_hooked_functions_exist() {
    let dir = tempfile::tempdir().unwrap();
    let facts = tcpconnlat_compat::btf::read(&unpacked(dir.path())).unwrap();
    assert_eq!(facts.sock.unwrap(), FROM_HEADERS);
    for func in Func::ALL {
        assert_eq!(facts.functions.get(func), Some(func.name()), "{func:?}");
    }
}

/// The reader against libbpf's full parser, on every BTF file at hand: the fixture, the
/// running kernel's own (when it has one), and the 4.14 and 5.4 kernels' where
/// TCPCONNLAT_KERNELS_DIR points to them (as CI's does).
#[test]
fn the_reader_agrees_with_libbpf() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![unpacked(dir.path())];
    if Path::new(tcpconnlat_compat::btf::VMLINUX).exists() {
        files.push(tcpconnlat_compat::btf::VMLINUX.into());
    }
    if let Some(kernels) = std::env::var_os("TCPCONNLAT_KERNELS_DIR") {
        for version in ["4.14", "5.4"] {
            let xz = Path::new(&kernels).join(version).join("vmlinux.btf.xz");
            let path = dir.path().join(format!("{version}.btf"));
            std::fs::write(&path, support::unxz(&xz)).unwrap();
            files.push(path);
        }
    }
    for path in &files {
        let ours = tcpconnlat_compat::btf::read(path).unwrap();
        let btf = libbpf_rs::btf::Btf::from_path(path).unwrap();
        for func in Func::ALL {
            let in_libbpf = btf
                .type_by_name::<libbpf_rs::btf::types::Func<'_>>(func.name())
                .is_some();
            assert_eq!(
                ours.functions.get(func).is_some(),
                in_libbpf,
                "{path:?} {func:?}"
            );
        }
        // fentry programs attach at these ids (tracer/core_btf.rs): libbpf's own.
        for func in Func::ALL {
            let theirs = btf.type_by_name::<libbpf_rs::btf::types::Func<'_>>(func.name());
            assert_eq!(
                ours.function_ids.get(func),
                theirs.map(|f| f.type_id().into()),
                "{path:?} {func:?}"
            );
        }
        // The BTF-typed state tracepoint attaches at this one (5.5+; none before).
        let typedef = tcpconnlat_compat::btf::STATE_TRACEPOINT_TYPEDEF;
        let theirs = btf.type_by_name::<libbpf_rs::btf::types::Typedef<'_>>(typedef);
        assert_eq!(
            ours.state_tracepoint_id,
            theirs.map(|t| t.type_id().into()),
            "{path:?}"
        );
        let sock = btf
            .type_by_name::<libbpf_rs::btf::types::Struct<'_>>("sock")
            .unwrap();
        // Members of struct sock found directly (the nested ones are checked against
        // headers above).
        let sk_err = sock
            .iter()
            .find(|m| m.name.is_some_and(|n| n == "sk_err"))
            .unwrap();
        let libbpf_rs::btf::types::MemberAttr::Normal { offset } = sk_err.attr else {
            panic!("sk_err is not a bitfield")
        };
        assert_eq!(
            ours.sock.unwrap().get("err"),
            Some((offset / 8) as u16),
            "{path:?}"
        );
    }
}
