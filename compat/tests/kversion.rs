//! LINUX_VERSION_CODE from vDSO images captured from real kernels (ci/capture-fixture.sh).

use std::fs;
use std::path::Path;

use tcpconnlat_compat::kversion::{self, KversionError};
use tcpconnlat_compat::KernelVersion;

/// The code a kernel of this release states: stable kernels clamp the sublevel to 255.
fn expected_code(release: &str) -> u32 {
    let KernelVersion(a, b, c) = KernelVersion::parse(release).unwrap();
    (a << 16) | (b << 8) | c.min(255)
}

#[test]
fn every_captured_vdso_states_its_kernels_version() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = Vec::new();
    for entry in fs::read_dir(&fixtures).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(image) = fs::read(dir.join("vdso")) else {
            continue;
        };
        let release = fs::read_to_string(dir.join("proc/sys/kernel/osrelease")).unwrap();
        let code = kversion::from_vdso(&image).unwrap();
        assert_eq!(
            code,
            expected_code(release.trim()),
            "{}: {} for release {}",
            dir.display(),
            kversion::display(code),
            release.trim()
        );
        seen.push(release.trim().to_owned());
    }
    assert!(!seen.is_empty(), "no vDSO fixture");
}

/// 4.14.325 (a clamped stable kernel): the release says 325, the kernel 255.
#[test]
fn a_clamped_sublevel_is_read_as_the_kernel_states_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old414");
    let image = fs::read(dir.join("vdso")).unwrap();
    assert_eq!(
        kversion::display(kversion::from_vdso(&image).unwrap()),
        "4.14.255"
    );
}

#[test]
fn images_that_are_not_a_vdso_are_errors_not_panics() {
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host-6.18/vdso");
    let image = fs::read(host).unwrap();
    for cut in [0, 4, 63, 64, 200, image.len() / 2] {
        let _ = kversion::from_vdso(&image[..cut]);
    }
    assert!(matches!(
        kversion::from_vdso(b"not an ELF image at all"),
        Err(KversionError::BadElf(_))
    ));
    // An ELF without the note: the vDSO's own header with its program headers removed.
    let mut stripped = image.clone();
    stripped[56..58].copy_from_slice(&0u16.to_le_bytes()); // e_phnum
    assert_eq!(kversion::from_vdso(&stripped), Err(KversionError::NoNote));
}
