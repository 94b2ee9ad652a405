//! A BTF holding only what the CO-RE probes read, made at start-up from the kernel's own:
//! libbpf relocates the probes against it (`btf_custom_path`) instead of reading the
//! kernel's whole BTF, megabytes it would hold twice at once. The idea of `bpftool gen
//! min_core_btf`, at run time: the root structs and every type they embed, member for
//! member at the kernel's offsets, names and sizes; pointers become `void *` (the probes
//! follow none through CO-RE, and libbpf takes any pointer for any other), so what a
//! struct only points to is left out. For struct sock that is about a hundred types.

use std::collections::HashMap;

use super::{kind, word, StreamedBtf, Type, MAGIC};

/// Deeper than any kernel struct nests: a cycle, in a corrupt file.
const MAX_DEPTH: u32 = 64;

pub(super) struct MinimalBtf<'a> {
    from: &'a StreamedBtf,
    /// The new id of each kernel type kept.
    ids: HashMap<u32, u32>,
    /// Each kept type's record, at its new id - 1.
    records: Vec<Vec<u8>>,
    /// The string section: names of kept types, members and values.
    strings: Vec<u8>,
    offsets: HashMap<Vec<u8>, u32>,
    /// The one `void *` every pointer becomes.
    void_ptr: Option<u32>,
}

impl<'a> MinimalBtf<'a> {
    /// Raw BTF with the types `roots` (ids in `from`) and what they embed.
    pub(super) fn of(from: &'a StreamedBtf, roots: &[u32]) -> Result<Vec<u8>, String> {
        let mut btf = MinimalBtf {
            from,
            ids: HashMap::new(),
            records: Vec::new(),
            strings: vec![0],
            offsets: HashMap::from([(Vec::new(), 0)]),
            void_ptr: None,
        };
        for &root in roots {
            btf.keep(root, 0)?;
        }
        Ok(btf.encode())
    }

    /// Keep type `id` (and what it needs): its new id.
    fn keep(&mut self, id: u32, depth: u32) -> Result<u32, String> {
        if id == 0 {
            return Ok(0);
        }
        if let Some(&new) = self.ids.get(&id) {
            return Ok(new);
        }
        if depth > MAX_DEPTH {
            return Err("BTF types nest too deep (a cycle?)".into());
        }
        let (t, extra) = self
            .from
            .record(id)
            .ok_or_else(|| format!("BTF type {id} is missing or truncated"))?;
        if t.kind == kind::PTR {
            return Ok(self.void_ptr());
        }
        // Its id first: members may lead back to it.
        let new = self.reserve();
        self.ids.insert(id, new);
        let record = self.translate(&t, &extra, depth)?;
        self.records[new as usize - 1] = record;
        Ok(new)
    }

    fn reserve(&mut self) -> u32 {
        self.records.push(Vec::new());
        self.records.len() as u32
    }

    fn void_ptr(&mut self) -> u32 {
        if let Some(id) = self.void_ptr {
            return id;
        }
        let id = self.reserve();
        self.records[id as usize - 1] = header(0, kind::PTR, false, 0, 0);
        self.void_ptr = Some(id);
        id
    }

    /// `t`'s record with names and type references made ours.
    fn translate(&mut self, t: &Type, extra: &[u8], depth: u32) -> Result<Vec<u8>, String> {
        let name = self.string(t.name_off)?;
        let size_type = match t.kind {
            kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                self.keep(t.size_type, depth + 1)?
            }
            _ => t.size_type,
        };
        let mut record = header(name, t.kind, t.kind_flag, t.vlen, size_type);
        let words = |i: usize| word(extra, 4 * i);
        match t.kind {
            kind::INT
            | kind::FLOAT
            | kind::FWD
            | kind::TYPEDEF
            | kind::VOLATILE
            | kind::CONST
            | kind::RESTRICT
            | kind::TYPE_TAG => record.extend_from_slice(extra),
            kind::ARRAY => {
                let elem = self.keep(words(0), depth + 1)?;
                let index = self.keep(words(1), depth + 1)?;
                push(&mut record, &[elem, index, words(2)]);
            }
            kind::STRUCT | kind::UNION => {
                for &[name_off, ty, offset] in &t.members {
                    let name = self.string(name_off)?;
                    let ty = self.keep(ty, depth + 1)?;
                    push(&mut record, &[name, ty, offset]);
                }
            }
            kind::ENUM => {
                for i in 0..t.vlen {
                    let name = self.string(words(2 * i))?;
                    push(&mut record, &[name, words(2 * i + 1)]);
                }
            }
            kind::ENUM64 => {
                for i in 0..t.vlen {
                    let name = self.string(words(3 * i))?;
                    push(&mut record, &[name, words(3 * i + 1), words(3 * i + 2)]);
                }
            }
            other => return Err(format!("BTF kind {other} inside a struct")),
        }
        Ok(record)
    }

    /// Our offset of the kernel's string at `offset`.
    fn string(&mut self, offset: u32) -> Result<u32, String> {
        if offset == 0 {
            return Ok(0);
        }
        let name = self
            .from
            .string_at(offset)
            .ok_or_else(|| format!("BTF string {offset} is missing or truncated"))?;
        if let Some(&ours) = self.offsets.get(&name) {
            return Ok(ours);
        }
        let ours = self.strings.len() as u32;
        self.strings.extend_from_slice(&name);
        self.strings.push(0);
        self.offsets.insert(name, ours);
        Ok(ours)
    }

    /// The raw BTF: header, types, strings.
    fn encode(self) -> Vec<u8> {
        let types: Vec<u8> = self.records.concat();
        let mut out = Vec::with_capacity(24 + types.len() + self.strings.len());
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.extend_from_slice(&[1, 0]); // version 1, no flags
        let (types_len, strings_len) = (types.len() as u32, self.strings.len() as u32);
        push(&mut out, &[24, 0, types_len, types_len, strings_len]);
        out.extend_from_slice(&types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A struct btf_type.
fn header(name: u32, kind: u32, kind_flag: bool, vlen: usize, size_type: u32) -> Vec<u8> {
    let info = u32::from(kind_flag) << 31 | kind << 24 | vlen as u32;
    let mut record = Vec::with_capacity(12);
    push(&mut record, &[name, info, size_type]);
    record
}

fn push(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_ne_bytes());
    }
}
