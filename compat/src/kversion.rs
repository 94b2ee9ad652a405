//! The running kernel's `LINUX_VERSION_CODE`, as the kernel itself states it.
//!
//! Kernels before 5.0 load a kprobe program only if the program's `kern_version` equals
//! their `LINUX_VERSION_CODE`. The release string is no reliable source for it: stable
//! kernels from 4.14.252 and 4.19.222 on clamp the sublevel to 255 (4.19.222 says
//! 4.19.255), and distributions put their own numbers there (Debian 10's `4.19.0-N-amd64`).
//! The vDSO, which the kernel maps into every process, carries the real value in an ELF
//! note (name "Linux", type 0, a 32-bit value), as cilium/ebpf reads it.

use object::elf::PT_NOTE;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::Endianness;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KversionError {
    #[error("the vDSO is not a readable ELF image: {0}")]
    BadElf(String),
    #[error("the vDSO has no Linux version note")]
    NoNote,
}

/// `LINUX_VERSION_CODE` from a vDSO image (the bytes of the `[vdso]` mapping).
pub fn from_vdso(image: &[u8]) -> Result<u32, KversionError> {
    let bad = |e: object::Error| KversionError::BadElf(e.to_string());
    let elf = ElfFile64::<Endianness>::parse(image).map_err(bad)?;
    let endian = elf.endian();
    for header in elf.elf_program_headers() {
        if header.p_type(endian) != PT_NOTE {
            continue;
        }
        let Some(mut notes) = header.notes(endian, image).map_err(bad)? else {
            continue;
        };
        while let Some(note) = notes.next().map_err(bad)? {
            if note.name() == b"Linux" && note.n_type(endian) == 0 {
                if let Ok(value) = <[u8; 4]>::try_from(note.desc()) {
                    return Ok(match endian {
                        Endianness::Little => u32::from_le_bytes(value),
                        Endianness::Big => u32::from_be_bytes(value),
                    });
                }
            }
        }
    }
    Err(KversionError::NoNote)
}

/// `a.b.c` of a version code.
pub fn display(code: u32) -> String {
    format!("{}.{}.{}", code >> 16, (code >> 8) & 0xff, code & 0xff)
}
